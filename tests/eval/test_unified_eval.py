"""`wft eval` on a student of `wft unified`: its diffusion loss beside the next-token one,
and each decoding mode's speed and task accuracy."""

import torch
from typer.testing import CliRunner

from tests.conftest import tiny_llama
from tests.eval.conftest import STUDENT_SHAPE
from wftool.cli import app
from wftool.commands.evaluate import EvalOptions, run_eval
from wftool.eval.diffusion import diffusion_scores
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.mask_token import DiffusionSettings, add_mask_token
from wftool.model.surgery import convert_to_bitnet


def _unified_student(tokenizer, path):
    model = tiny_llama(**STUDENT_SHAPE)
    convert_to_bitnet(model, FAMILIES["llama"])
    mask_id = add_mask_token(model, tokenizer)
    settings = DiffusionSettings(mask_id, shift=True, attention="block", block_size=4)
    meta = TernaryMetadata("llama", "paper", None, stage="unified",
                           diffusion=settings.to_dict())
    save_model_dir(model, tokenizer, path, meta)
    return model, settings


def test_each_decoding_mode_is_scored_on_the_same_data(tokenizer, text_file, task_file,
                                                       tmp_path):
    from copy import deepcopy

    model, settings = _unified_student(deepcopy(tokenizer), tmp_path / "unified")
    report = run_eval([str(tmp_path / "unified")],
                      EvalOptions(text=text_file, task=task_file, decode_tokens=6),
                      console=_quiet())
    row = report.models[0]
    assert row["text_dlm_loss"] > 0 and 0 <= row["text_dlm_accuracy"] <= 1
    assert row["task_dlm_loss"] > 0
    modes = row["decoding"]
    assert set(modes) == {"ar", "diffusion", "speculative"}
    for numbers in modes.values():
        assert numbers["tokens_per_second"] > 0 and numbers["tokens_per_forward"] > 0
        assert 0 <= numbers["task_accuracy"] <= 1 and numbers["task_examples"] > 0
    # One forward per token after the first, which the prompt's prefill gives.
    assert abs(modes["ar"]["tokens_per_forward"] - 6 / 5) < 1e-9
    assert modes["speculative"]["equals_ar"] is True
    assert modes["speculative"]["task_accuracy"] == modes["ar"]["task_accuracy"]


def test_diffusion_scores_use_the_same_masks_for_every_call(tokenizer, tmp_path):
    from copy import deepcopy

    model, settings = _unified_student(deepcopy(tokenizer), tmp_path / "unified")
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 16))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.arange(16).repeat(2, 1)}
    first = diffusion_scores(model, [batch], settings)
    torch.manual_seed(123)  # the global generator plays no part
    assert diffusion_scores(model, [batch], settings) == first


def test_the_decoding_table_is_printed_and_can_be_skipped(tokenizer, text_file, tmp_path):
    from copy import deepcopy

    _unified_student(deepcopy(tokenizer), tmp_path / "unified")
    shown = CliRunner().invoke(app, ["eval", str(tmp_path / "unified"), "--text",
                                     str(text_file), "--decode-tokens", "4"])
    assert shown.exit_code == 0, shown.output
    assert "decoding modes" in shown.output and "speculative" in shown.output
    assert "the same tokens as ar" in " ".join(shown.output.split())
    skipped = CliRunner().invoke(app, ["eval", str(tmp_path / "unified"), "--text",
                                       str(text_file), "--decode-tokens", "0"])
    assert skipped.exit_code == 0 and "decoding modes" not in skipped.output


def _quiet():
    from rich.console import Console

    return Console(file=open("/dev/null", "w"))
