"""From recipe to HTTP: pipeline, TQ1_0 / TQ2_0 exports validated in llama.cpp, then served."""

import pytest
from typer.testing import CliRunner

from tests.conftest import require_llamacpp
from tests.serve.client import post, running_server, stream
from tests.train.conftest import SMALL_MODEL, small_recipe
from wftool.cli import app

SHORT = {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
         "save_every": 2, "eval_every": 2}


@pytest.mark.slow
def test_pipeline_student_exports_validates_and_serves(tmp_path):
    require_llamacpp()
    # Widths that TQ blocks hold (rows of 256).
    model = {"config": {**SMALL_MODEL, "hidden_size": 256, "intermediate_size": 512},
             "tokenizer": "synthetic", "dtype": "float32"}
    recipe = small_recipe(tmp_path, model=model, stages=["convert", "distill"],
                          teacher={"train": {"pretrain": SHORT, "finetune": SHORT}},
                          pipeline={"baseline": False})
    runner = CliRunner()
    result = runner.invoke(app, ["pipeline", recipe])
    assert result.exit_code == 0, result.output
    for export_type in ("tq1_0", "tq2_0"):
        result = runner.invoke(app, ["export-gguf", recipe, "--type", export_type],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "every ternary value exact" in result.output
        assert "logits rel RMS" in result.output  # compared with llama.cpp, within limits
        assert (tmp_path / "runs" / "small" / f"small-{export_type}.gguf").is_file()
    with running_server(recipe) as base:  # the recipe's serve section: llamacpp, tq2_0
        status, body = post(base + "/v1/completions",
                            {"prompt": "kiza pa", "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        usage = body["usage"]
        assert body["model"] == "small" and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # A barely trained model may end at once; either way the answer says why it stopped.
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        events = stream(base + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "kiza"}], "max_tokens": 8})
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"]
