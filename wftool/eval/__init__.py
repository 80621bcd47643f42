"""`wft eval`: held-out data sets, the llama.cpp backend and the lm-eval-harness adapter.

Every backend is scored by the same code (`wftool.train.evaluation.evaluate_model`) on the
same token ids, so a teacher, its ternary student and the student's GGUF export line up in
one table.
"""
