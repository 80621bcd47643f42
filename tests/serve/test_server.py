"""`wft serve` as a real process: both backends, streaming, limits and errors over HTTP."""

import json
import socket

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import require_llamacpp
from tests.serve.client import get, post, running_server, stream
from tests.serve.conftest import DECISIVE
from wftool.cli import app

PROMPT = "kiza pa povo vo"


def _reference_greedy(model, tokenizer, prompt: str, steps: int) -> tuple[str, int]:
    """Greedy text from full forwards of the student (BitLinear, latent weights), up to the
    first near-tie, where float rounding may legitimately pick the other token."""
    ids = tokenizer(prompt)["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            top2 = logits.topk(2).values
            if top2[0] - top2[1] < DECISIVE:
                break
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


@pytest.fixture(scope="module")
def torch_server(qwen3_student):
    path, _ = qwen3_student
    with running_server(str(path), "--max-tokens", "32", "--max-prompt-tokens", "64",
                        "--model-name", "qwen3-student") as base:
        yield base


def test_qwen3_student_served_by_torch_matches_its_pytorch_forward(torch_server, qwen3_student,
                                                                   tokenizer):
    _, model = qwen3_student
    expected, decided = _reference_greedy(model, tokenizer, PROMPT, 16)
    assert decided >= 4
    status, body = post(torch_server + "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "qwen3-student"
    assert body["choices"][0]["text"].startswith(expected)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(PROMPT)["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_chat_equals_the_whole_answer(torch_server):
    request = {"messages": [{"role": "user", "content": "kiza pa"}], "max_tokens": 12,
               "temperature": 0, "stream_options": {"include_usage": True}}
    status, whole = post(torch_server + "/v1/chat/completions", request)
    assert status == 200, whole
    events = stream(torch_server + "/v1/chat/completions", request)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == whole["usage"]


def test_models_and_health(torch_server):
    assert get(torch_server + "/v1/models")[1]["data"][0]["id"] == "qwen3-student"
    assert get(torch_server + "/health")[1]["backend"] == "torch"


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": PROMPT, "n": 2}, 400, "n"),
    ({"prompt": PROMPT, "max_tokens": 33}, 400, "max_tokens"),
    ({"prompt": "kiza pa " * 40}, 400, "prompt"),
    ({"prompt": PROMPT, "model": "/etc/passwd"}, 404, "model"),
    ({"prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors(torch_server, body, status, param):
    got, error = post(torch_server + "/v1/completions", body)
    assert got == status
    assert error["error"]["param"] == param and error["error"]["message"]


def test_chat_rejects_non_text_content(torch_server):
    image = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    status, error = post(torch_server + "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": [image]}]})
    assert status == 400 and error["error"]["param"].startswith("messages")


def test_llamacpp_backend_serves_a_tq2_0_export(tmp_path, llama_student, tokenizer):
    require_llamacpp()
    from llama_cpp import Llama

    from wftool.export.gguf_target import GgufTarget
    from wftool.export.gguf_writer import write_gguf
    from wftool.model.families import FAMILIES

    path = tmp_path / "student-tq2_0.gguf"
    write_gguf(llama_student, tokenizer, FAMILIES["llama"], GgufTarget("bitnet", "tq2_0"), path)
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    direct = []
    for token in llm.generate(prompt_ids, temp=0.0):
        if token == llm.token_eos() or len(direct) == 10:
            break
        direct.append(token)
    llm.close()
    with running_server(str(path)) as base:
        status, body = post(base + "/v1/completions",
                            {"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == tokenizer.decode(direct, skip_special_tokens=True)
        assert body["model"] == "student-tq2_0"
        events = stream(base + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "kiza"}], "max_tokens": 6})
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert get(base + "/health")[1]["backend"] == "llamacpp"


def test_serve_reports_bad_sources_and_taken_ports(tmp_path, qwen3_student):
    runner = CliRunner()
    missing = runner.invoke(app, ["serve", str(tmp_path / "nope.gguf")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    path, _ = qwen3_student
    wrong = runner.invoke(app, ["serve", str(path), "--backend", "llamacpp"])
    assert wrong.exit_code == 2 and "wft export-gguf" in wrong.output
    bad = runner.invoke(app, ["serve", str(path), "--max-tokens", "0"])
    assert bad.exit_code == 2 and "--max-tokens" in bad.output
    device = runner.invoke(app, ["serve", str(path), "--device", "abacus", "--port", "0"])
    assert device.exit_code == 2 and "--device abacus" in device.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["serve", str(path), "--port", str(port)])
    assert busy.exit_code == 2 and "cannot listen" in busy.output
    recipe = runner.invoke(app, ["serve", "tiny", f"output_dir={tmp_path}"])
    assert recipe.exit_code == 2 and "wft export-gguf tiny" in " ".join(recipe.output.split())


def test_an_unavailable_device_is_refused_before_the_port_is_bound(tmp_path, qwen3_student,
                                                                   monkeypatch):
    """--device, or the recipe's serve.device, naming a GPU PyTorch cannot see (as on this
    CPU machine): exit 2 naming the flag or field, before a port is taken or a model loads."""
    import torch

    def no_bind(*args):
        raise AssertionError("the port was bound although the device cannot be used")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr("wftool.commands.serve.bind", no_bind)
    runner = CliRunner()
    path, _ = qwen3_student
    result = runner.invoke(app, ["serve", str(path), "--device", "cuda"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--device cuda: no CUDA GPU is visible to PyTorch" in text
    assert "available here: cpu" in text and "use --device cpu" in text
    converted = tmp_path / "tiny" / "convert" / "final"  # what `wft convert tiny` leaves
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    result = runner.invoke(app, ["serve", "tiny", f"output_dir={tmp_path}",
                                 "serve.backend=torch", "serve.device=cuda:1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "serve.device cuda:1: no CUDA GPU" in text and "set serve.device=cpu" in text


def test_malformed_and_oversized_bodies_get_4xx(torch_server):
    import http.client
    from urllib.parse import urlparse

    address = urlparse(torch_server)

    def send(body: bytes, chunked: bool = False) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        try:
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            connection.request("POST", "/v1/completions", body=chunks if chunked else body,
                               headers={"Content-Type": "application/json"},
                               encode_chunked=chunked)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    status, error = send(b'{"prompt": "kiza", ')
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    big = json.dumps({"prompt": "kiza " * 300_000}).encode()  # 1.5 MB
    assert send(big)[0] == 413
    assert send(big, chunked=True)[0] == 413  # no Content-Length to trust
    status, error = send(json.dumps({"prompt": ""}).encode())
    assert status == 400 and error["error"]["param"] == "prompt"
