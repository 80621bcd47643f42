"""Runtimes that run exported models outside PyTorch: llama.cpp (through llama-cpp-python).

`wft eval` and `wft serve` open GGUF files through `wftool.runtime.llamacpp`, so the import,
the load and their errors are written once.
"""
