"""A client that leaves mid-stream frees its admission slot and the engine at once."""

import asyncio
import copy
import json

import pytest
from starlette.requests import ClientDisconnect

from tests.serve.client import completion_scope
from wftool.quant.ternary_linear import pack_ternary_layers
from wftool.serve.app import Limits, create_app
from wftool.serve.engine_torch import TorchEngine


@pytest.fixture(scope="module")
def app(llama_student, tokenizer):
    model = copy.deepcopy(llama_student)
    pack_ternary_layers(model)
    return create_app(TorchEngine(model, tokenizer), "student", "torch",
                      Limits(max_tokens=64, max_prompt_tokens=64, max_concurrent=1))


def _call(app, body: dict, leave_after_chunks: int | None) -> list[bytes]:
    """Run one request through the ASGI app; the client vanishes (its socket errors) after
    `leave_after_chunks` body chunks, if given."""
    payload = json.dumps(body).encode()
    received = []
    state = {"sent_body": False}

    async def receive():
        if not state["sent_body"]:
            state["sent_body"] = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.sleep(3600)  # the client never says goodbye politely

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            if leave_after_chunks is not None and len(received) >= leave_after_chunks:
                raise OSError("connection reset by peer")
            received.append(message["body"])
        elif message["type"] == "http.response.start":
            received.append(str(message["status"]).encode())

    scope = completion_scope(payload)

    async def run():
        try:
            await app(scope, receive, send)
        except ClientDisconnect:  # what uvicorn sees and drops
            pass

    asyncio.run(run())
    return received


def test_a_vanished_streaming_client_frees_the_server(app):
    body = {"prompt": "kiza pa", "max_tokens": 64, "stream": True, "temperature": 1.0,
            "seed": 1}
    got = _call(app, body, leave_after_chunks=2)
    assert got[0] == b"200" and len(got) == 2  # the client left after one event
    # With max_concurrent 1, a slot still held would turn this into a 429.
    again = _call(app, {"prompt": "kiza pa", "max_tokens": 4, "temperature": 0},
                  leave_after_chunks=None)
    assert again[0] == b"200", again
    assert json.loads(again[1])["usage"]["completion_tokens"] >= 1
