"""The `decoding` request field: diffusion and speculative decoding of a unified student
through the OpenAI-compatible app, and clear 400s where they cannot run."""

import copy
import json

import pytest

from tests.conftest import tiny_llama
from tests.serve.client import call_app, events_of
from wftool.model.mask_token import DiffusionSettings, add_mask_token
from wftool.serve.app import Limits, create_app
from wftool.serve.engine_torch import TorchEngine

PROMPT = "kiza pa povo vo"
LIMITS = Limits(max_tokens=16, max_prompt_tokens=64, max_concurrent=2)


def _unified(model, tokenizer, **settings) -> DiffusionSettings:
    """Give `model` and `tokenizer` a mask token, and `model` the settings `wft unified`
    saves with it."""
    mask_id = add_mask_token(model, tokenizer)
    chosen = DiffusionSettings(mask_id, **{"block_size": 4, **settings})
    model.config.wft = {"diffusion": chosen.to_dict()}
    return chosen


@pytest.fixture(scope="module")
def unified_engine(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer keeps no mask token
    model = tiny_llama(vocab_size=512, hidden_size=32, intermediate_size=64,
                       max_position_embeddings=128, initializer_range=0.5)
    _unified(model, tokenizer)
    return TorchEngine(model, tokenizer)


@pytest.fixture(scope="module")
def unified_app(unified_engine):
    return create_app(unified_engine, "unified", "torch", LIMITS)


@pytest.fixture(scope="module")
def plain_app(tokenizer):
    model = tiny_llama(vocab_size=512, hidden_size=32, intermediate_size=64)
    return create_app(TorchEngine(model, tokenizer), "plain", "torch", LIMITS)


def _post(app, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    status, raw = call_app(app, path, body)
    return status, json.loads(raw)


@pytest.mark.parametrize("decoding,options", [
    ("diffusion", {}), ("diffusion", {"diffusion_threshold": 0.0}),
    ("diffusion", {"diffusion_block_size": 3, "diffusion_steps_per_block": 2}),
    ("speculative", {"diffusion_block_size": 2}),
])
def test_a_unified_student_answers_diffusion_requests(unified_app, decoding, options):
    status, body = _post(unified_app, {"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                       "decoding": decoding, **options})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 10


def test_greedy_speculative_answers_as_autoregressive(unified_app):
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    _, ar = _post(unified_app, request)
    for block_size in (2, 4):
        status, speculative = _post(unified_app, {**request, "decoding": "speculative",
                                                  "diffusion_block_size": block_size})
        assert status == 200 and speculative["choices"] == ar["choices"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "kiza pa"}]}),
])
def test_streamed_diffusion_equals_the_whole_answer(unified_app, path, body):
    request = {**body, "max_tokens": 10, "temperature": 0, "decoding": "diffusion",
               "stream_options": {"include_usage": True}}
    status, whole = _post(unified_app, request, path)
    assert status == 200, whole
    status, raw = call_app(unified_app, path, {**request, "stream": True})
    events = events_of(raw)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
    if "messages" in body:
        text = "".join(c["delta"].get("content", "") for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == whole["usage"]


def test_health_lists_the_decodings_served(unified_app, plain_app):
    assert json.loads(call_app(unified_app, "/health")[1])["decoding"] == \
        ["ar", "diffusion", "speculative"]
    assert json.loads(call_app(plain_app, "/health")[1])["decoding"] == ["ar"]


@pytest.mark.parametrize("decoding", ["diffusion", "speculative"])
def test_a_model_without_a_mask_token_names_the_fix(plain_app, decoding):
    status, error = _post(plain_app, {"prompt": PROMPT, "decoding": decoding})
    assert status == 400 and error["error"]["param"] == "decoding"
    assert "wft unified" in error["error"]["message"]


def test_llamacpp_refuses_diffusion_decoding(unified_engine):
    app = create_app(unified_engine, "gguf", "llamacpp", LIMITS)
    status, error = _post(app, {"prompt": PROMPT, "decoding": "diffusion"})
    assert status == 400 and error["error"]["param"] == "decoding"
    message = error["error"]["message"]
    assert "torch runtime" in message and "--backend torch" in message
    assert _post(app, {"prompt": PROMPT, "max_tokens": 2})[0] == 200  # "ar" still works


@pytest.mark.parametrize("options,param,message", [
    ({"decoding": "beam"}, "decoding", "'ar', 'diffusion' or 'speculative'"),
    ({"decoding": 1}, "decoding", "'ar', 'diffusion' or 'speculative'"),
    ({"decoding": "diffusion", "diffusion_block_size": 0}, "diffusion_block_size",
     "greater than or equal to 1"),
    ({"decoding": "diffusion", "diffusion_block_size": 2.0}, "diffusion_block_size",
     "must be an integer"),
    ({"decoding": "diffusion", "diffusion_threshold": 1.5}, "diffusion_threshold",
     "less than or equal to 1"),
    ({"decoding": "diffusion", "diffusion_threshold": "0.9"}, "diffusion_threshold",
     "must be a number"),
    ({"decoding": "diffusion", "diffusion_steps_per_block": 0}, "diffusion_steps_per_block",
     "greater than or equal to 1"),
    ({"diffusion_threshold": 0.5}, "diffusion_threshold",
     'applies to decoding "diffusion", not "ar"'),
    ({"decoding": "speculative", "diffusion_steps_per_block": 2},
     "diffusion_steps_per_block", 'applies to decoding "diffusion", not "speculative"'),
])
def test_bad_decoding_options_get_a_400_naming_the_field(unified_app, options, param, message):
    status, error = _post(unified_app, {"prompt": PROMPT, **options})
    assert status == 400 and error["error"]["param"] == param, error
    assert message in error["error"]["message"]


def test_a_saved_unified_student_serves_diffusion(tmp_path, tokenizer):
    """Settings travel in config.json (`wft.diffusion`) to the packed engine."""
    from wftool.model.checkpoint import TernaryMetadata, save_model_dir
    from wftool.model.families import FAMILIES
    from wftool.model.surgery import convert_to_bitnet

    tokenizer = copy.deepcopy(tokenizer)
    model = tiny_llama(vocab_size=512, hidden_size=32, intermediate_size=64,
                       max_position_embeddings=128)
    convert_to_bitnet(model, FAMILIES["llama"])
    chosen = _unified(model, tokenizer, attention="causal", block_size=3)
    meta = TernaryMetadata("llama", "paper", None, diffusion=chosen.to_dict())
    save_model_dir(model, tokenizer, tmp_path / "student", meta)
    engine = TorchEngine.load(tmp_path / "student")
    assert engine.diffusion == chosen and engine.diffusion_problem is None
    app = create_app(engine, "student", "torch", LIMITS)
    status, body = _post(app, {"prompt": PROMPT, "max_tokens": 7, "decoding": "diffusion",
                               "seed": 3})
    assert status == 200 and body["choices"][0]["text"], body


def test_the_serve_banner_names_the_decodings(unified_engine):
    from rich.console import Console

    from wftool.commands.serve import _print_decodings

    console = Console(record=True, width=200)
    _print_decodings(unified_engine, console)
    assert '"diffusion", "speculative" (request field "decoding"; block size 4' in \
        console.export_text()
