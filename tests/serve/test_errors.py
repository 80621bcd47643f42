"""Error bodies: what pydantic refused, said in JSON's terms and naming the field; a bug is a
JSON 500 that does not describe it to the client, and its traceback is logged once."""

import asyncio
import json
import logging

import pytest
from pydantic import ValidationError

from tests.serve.client import completion_scope
from wftool.serve.app import Limits, create_app
from wftool.serve.errors import validation_error
from wftool.serve.protocol import ChatCompletionRequest, CompletionRequest

SECRET = "/home/someone/private/model.bin"


@pytest.mark.parametrize("model,body,param,message", [
    (CompletionRequest, {"prompt": 5}, "prompt", "prompt: must be a string or an array"),
    (CompletionRequest, {"prompt": "a", "stop": ["a", 1]}, "stop[1]", "stop[1]: must be a string"),
    (CompletionRequest, {"prompt": "a", "max_tokens": -1}, "max_tokens",
     "max_tokens: must be greater than or equal to 0"),
    (CompletionRequest, {"prompt": "a", "n": 2}, "n",
     "n: not supported by this server (accepted: 1)"),
    (CompletionRequest, {"prompt": "a", "stop": ["a"] * 5}, "stop", "stop: at most 4 stop"),
    (CompletionRequest, {}, "prompt", "prompt: is required"),
    (ChatCompletionRequest, {"messages": [{"role": "\ud800", "content": "a"}]},
     "messages[0].role", "messages[0].role: holds a lone UTF-16 surrogate"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"text": "a"}]}]},
     "messages[0].content[0].type", "messages[0].content[0].type: is required"),
])
def test_validation_errors_name_the_field_in_json_terms(model, body, param, message):
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    # FastAPI reports locations under "body"; pydantic alone does not.
    errors = [{**e, "loc": ("body", *e["loc"])} for e in refused.value.errors()]
    for found in (validation_error(errors), validation_error(refused.value.errors())):
        assert found.status == 400 and found.param == param
        assert found.message.startswith(message)


class _BrokenEngine:
    """An engine with a bug: encoding fails, or sampling fails after one token."""

    context_length = 64
    chat_template = None

    def __init__(self, fails_in: str):
        self.fails_in = fails_in

    def encode(self, text, chat):
        if self.fails_in == "encode":
            raise RuntimeError(SECRET)
        return [1, 2, 3]

    def decode(self, ids):
        return "x" * len(ids)

    def stop_ids(self, chat):
        return set()

    def sample(self, prompt_ids, sampling, max_tokens=None, decoding=None):
        yield 5
        raise RuntimeError(SECRET)


@pytest.fixture
def logged():
    """Error records of the server's logger (uvicorn's may not propagate to the root)."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _post(app, body: dict) -> tuple[int, bytes]:
    """One request through the ASGI app: its status and whole body."""
    payload, sent, received = json.dumps(body).encode(), [], {"status": None}

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            received["status"] = message["status"]
        elif message["type"] == "http.response.body":
            received.setdefault("body", []).append(message.get("body", b""))

    scope = completion_scope(payload)
    asyncio.run(app(scope, receive, send))
    return received["status"], b"".join(received.get("body", []))


def _app(fails_in: str):
    return create_app(_BrokenEngine(fails_in), "broken", "torch",
                      Limits(max_tokens=8, max_prompt_tokens=8, max_concurrent=1))


@pytest.mark.parametrize("fails_in", ["encode", "sample"])
def test_a_bug_is_a_json_500_that_keeps_its_cause_in_the_log(logged, fails_in):
    app = _app(fails_in)
    status, raw = _post(app, {"prompt": "kiza", "max_tokens": 4})
    assert status == 500
    error = json.loads(raw)["error"]
    assert error["type"] == "server_error" and error["message"]
    assert SECRET not in raw.decode() and "Traceback" not in raw.decode()
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])
    # The admission slot was freed: with max_concurrent 1 a leak would be a 429 here.
    assert _post(app, {"prompt": "kiza", "max_tokens": 4})[0] == 500


def test_a_bug_mid_stream_is_reported_in_band_and_logged_once(logged):
    status, raw = _post(_app("sample"), {"prompt": "kiza", "max_tokens": 4, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in raw.decode().splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert SECRET not in raw.decode()
    assert len(logged) == 1 and logged[0].exc_info is not None
