"""`wft export-gguf` as a user runs it: what it refuses before writing, what it never leaves
behind, where the file goes, and which prompts its llama.cpp check uses."""

import errno

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_qwen3
from tests.export.cli import convert_tiny, export
from wftool.cli import app
from wftool.commands import export as export_command
from wftool.commands.export import resolve_export, validation_prompts
from wftool.errors import WftError
from wftool.export.validate import VALIDATION_PROMPTS
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory):
    """The tiny recipe's student without sub-norms (llama.cpp `llama`, Q/K permuted)."""
    return convert_tiny(tmp_path_factory.mktemp("plain"), "convert.sub_norm=none")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_file_that_fails_validation_is_not_written(tmp_path, plain_student, monkeypatch):
    from wftool.export import gguf_writer

    out = tmp_path / "plain.gguf"
    code, text = export(plain_student, out, "--type", "f16")
    assert code == 0, text
    good = out.read_bytes()
    # A writer bug (Q/K not permuted for llama.cpp's RoPE): the read-back must catch it, and
    # neither the bad file nor a temporary one may be left, while the older good file stays.
    monkeypatch.setattr(gguf_writer, "llama_rope_permute", lambda rows, heads: rows)
    code, text = export(plain_student, out, "--type", "f16", "--force")
    assert code == 1
    assert "not written: a check failed" in text and "read-back │ FAILED" in text
    assert "blk.0.attn_q.weight" in text
    assert out.read_bytes() == good
    fresh = tmp_path / "fresh.gguf"
    code, _ = export(plain_student, fresh, "--type", "f16")
    assert code == 1 and not fresh.exists()
    assert _leftovers(tmp_path) == []


def test_an_existing_output_file_is_replaced_only_with_force(tmp_path, plain_student,
                                                             monkeypatch):
    out = tmp_path / "plain.gguf"
    out.write_bytes(b"an earlier export")

    def never_loaded(*args, **kwargs):
        raise AssertionError("the refusal comes before the model is loaded")

    with monkeypatch.context() as patched:
        patched.setattr(export_command, "load_model_dir", never_loaded)
        code, text = export(plain_student, out, "--type", "f16", "--no-validate")
    assert code == 2 and f"{out} exists already" in text and "pass --force" in text
    assert "Traceback" not in text and out.read_bytes() == b"an earlier export"
    code, text = export(plain_student, out, "--type", "f16", "--no-validate", "--force")
    assert code == 0, text
    assert out.read_bytes().startswith(b"GGUF") and _leftovers(tmp_path) == []
    # Code that calls the export functions itself (pipeline, benchmarks) replaces as before.
    request = resolve_export(str(plain_student), export_type="f16", output=out)
    assert request.output == out
    with pytest.raises(WftError, match="exists already"):
        resolve_export(str(plain_student), export_type="f16", output=out, force=False)


def test_a_file_llamacpp_cannot_load_is_not_written(tmp_path, plain_student, monkeypatch):
    from wftool.runtime import llamacpp

    def cannot_load(path, *args, **kwargs):
        raise WftError(f"llama.cpp cannot load {path}: unknown model architecture")

    monkeypatch.setattr(export_command, "llamacpp_available", lambda: True)
    monkeypatch.setattr(llamacpp, "open_llama", cannot_load)
    out = tmp_path / "plain.gguf"
    code, text = export(plain_student, out, "--type", "f16")
    assert code == 1
    assert "FAILED: cannot load the file" in text and "unknown model architecture" in text
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_output_directory_or_unwritable_path_is_a_clear_error(tmp_path, plain_student,
                                                                 monkeypatch):
    code, text = export(plain_student, tmp_path, "--type", "f16")
    assert code == 2 and f"--output {tmp_path} is a directory" in text
    assert "Traceback" not in text
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, text = export(plain_student, blocker / "m.gguf", "--type", "f16")
    assert code == 2 and f"cannot write {blocker / 'm.gguf'}" in text

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_command, "write_gguf", disk_full)
    code, text = export(plain_student, tmp_path / "m.gguf", "--type", "f16")
    assert code == 2 and "No space left on device" in text and "Traceback" not in text
    assert _leftovers(tmp_path) == []


def test_an_untied_head_is_refused_for_bitnet_with_its_fix(tmp_path):
    student = convert_tiny(tmp_path, "model.config.tie_word_embeddings=false")
    out = tmp_path / "x.gguf"
    code, text = export(student, out)
    assert code == 2 and "cannot be written exactly as a llama.cpp `bitnet`" in text
    assert "not tied" in text and "fix: convert with convert.sub_norm=none" in text
    assert not out.exists()


def test_a_qwen3_student_is_refused_with_the_torch_backend_as_the_way_out(tmp_path):
    model = tiny_qwen3(vocab_size=512, hidden_size=256, intermediate_size=512, head_dim=64,
                       tie_word_embeddings=True)
    convert_to_bitnet(model, FAMILIES["qwen3"], "paper")
    student = save_model_dir(model, train_synthetic_tokenizer(512), tmp_path / "qwen3",
                             TernaryMetadata("qwen3", "paper", None))
    out = tmp_path / "x.gguf"
    code, text = export(student, out, "--type", "f16")
    assert code == 2 and "QK-norm" in text and "wft serve --backend torch" in text
    assert not out.exists()


def test_the_type_is_lower_cased_and_the_name_comes_from_the_saved_recipe(tmp_path,
                                                                         plain_student):
    from gguf import GGUFReader

    result = runner.invoke(app, ["export-gguf", str(plain_student), "--type", "F16",
                                 "--no-validate"])
    assert result.exit_code == 0, result.output
    unnamed = plain_student.parent / "student-f16.gguf"  # the directory's name
    assert unnamed.is_file()
    unnamed.unlink()
    (plain_student / "recipe.yaml").write_text("name: tinier\n")
    try:
        request = resolve_export(str(plain_student), export_type="F16")
    finally:
        (plain_student / "recipe.yaml").unlink()
    assert request.name == "tinier" and request.export_type == "f16"
    assert request.output == plain_student.parent / "tinier-f16.gguf"
    result = runner.invoke(app, ["export-gguf", str(plain_student), "--type", "F16",
                                 "--no-validate", "--output", str(tmp_path / "n.gguf")])
    assert result.exit_code == 0, result.output
    name = GGUFReader(str(tmp_path / "n.gguf")).fields["general.name"]
    assert bytes(name.parts[-1]).decode() == "student"


def test_validate_on_the_command_line_overrides_the_recipe(tmp_path):
    result = runner.invoke(app, ["convert", "tiny", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    request = resolve_export("tiny", [f"output_dir={tmp_path}", "export.validate=false"])
    assert not request.validate and request.name == "tiny"
    assert request.model_dir == tmp_path / "tiny" / "convert" / "final"
    assert request.output == tmp_path / "tiny" / "tiny-tq2_0.gguf"
    assert resolve_export("tiny", [f"output_dir={tmp_path}", "export.validate=false"],
                          validate=True).validate
    result = runner.invoke(app, ["export-gguf", "tiny", f"output_dir={tmp_path}",
                                 "export.validate=false", "--validate"])
    assert result.exit_code == 0, result.output
    assert "every ternary value exact" in " ".join(result.output.split())
    assert request.output.is_file()


def test_threads_reach_the_llamacpp_check(tmp_path, plain_student, monkeypatch):
    seen = {}

    def compare(path, model, tokenizer, export_type, threads, prompts):
        seen["threads"] = threads
        return {"rel_rms": 1e-4, "top1": 1.0, "decode_tok_s": 10.0, "problems": []}

    monkeypatch.setattr(export_command, "llamacpp_available", lambda: True)
    monkeypatch.setattr(export_command, "compare_with_llamacpp", compare)
    code, text = export(plain_student, tmp_path / "m.gguf", "--type", "f16", "--threads", "3")
    assert code == 0, text
    assert seen == {"threads": 3} and "decode 10.0 tok/s" in text


RECIPE = """name: r
model:
  config: {model_type: llama}
  tokenizer: synthetic
data:
  eval_fraction: 0.1
  sources:
"""


def _saved_recipe(folder, *sources: str):
    folder.mkdir(exist_ok=True)
    (folder / "recipe.yaml").write_text(RECIPE + "".join(f"    - {s}\n" for s in sources))
    return folder


@pytest.fixture
def opened(monkeypatch):
    """The data sources validation_prompts opens; a hub data set fails as offline."""
    from wftool.data import sources

    seen, real = [], sources.open_reader

    def open_reader(source, fmt, seed):
        seen.append(source)
        if source.dataset:
            raise OSError("no network")
        return real(source, fmt, seed)

    monkeypatch.setattr(sources, "open_reader", open_reader)
    return seen


def test_validation_prompts_never_open_a_hub_data_set(tmp_path, opened):
    tokenizer = train_synthetic_tokenizer(512)
    hub = _saved_recipe(tmp_path / "hub", "{dataset: someone/corpus}")
    assert validation_prompts(hub, tokenizer) == list(VALIDATION_PROMPTS)
    mixed = _saved_recipe(tmp_path / "mixed", "{dataset: someone/corpus}", "{synthetic: true}")
    prompts = validation_prompts(mixed, tokenizer, n=3, max_tokens=20)
    assert len(prompts) == 3 and not set(prompts) & set(VALIDATION_PROMPTS)
    assert all(0 < len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 20 + 2
               for p in prompts)
    assert not any(source.dataset for source in opened)


def test_validation_prompts_read_local_files_and_fall_back_on_any_failure(tmp_path, opened):
    tokenizer = train_synthetic_tokenizer(512)
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(f"paragraph number {i} of the held out text" for i in range(40)))
    local = _saved_recipe(tmp_path / "local", f"{{files: [{text}]}}")
    prompts = validation_prompts(local, tokenizer, n=2)
    assert len(prompts) == 2 and all("held out text" in p for p in prompts)
    missing = _saved_recipe(tmp_path / "missing", f"{{files: [{tmp_path / 'gone.txt'}]}}")
    assert validation_prompts(missing, tokenizer) == list(VALIDATION_PROMPTS)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "recipe.yaml").write_text("name: [unclosed\n")
    assert validation_prompts(broken, tokenizer) == list(VALIDATION_PROMPTS)
    assert validation_prompts(tmp_path, tokenizer) == list(VALIDATION_PROMPTS)  # no recipe


def test_a_directory_without_tokenizer_files_is_refused(tmp_path):
    model = convert_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink(missing_ok=True)
    code, text = export(model, tmp_path / "x.gguf")
    assert code == 2 and "has no tokenizer files" in text and "Traceback" not in text
    assert not (tmp_path / "x.gguf").exists()


def test_a_stage_folder_exports_its_final_directory_as_its_recipe_says(tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["convert", "tiny", f"output_dir={runs}",
                               "export.type=f16"]).exit_code == 0
    stage = runs / "tiny" / "convert"
    (stage / "final" / "recipe.yaml").write_text("name: tiny\nexport: {type: f16}\n")
    request = resolve_export(str(stage))
    assert request.model_dir == stage / "final"
    assert (request.name, request.export_type) == ("tiny", "f16")  # the saved recipe's type
    assert request.output == stage / "tiny-f16.gguf"
    code, text = export(stage, tmp_path / "s.gguf", "--no-validate")
    assert code == 0 and "bitnet, F16" in text
