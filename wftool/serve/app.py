"""The OpenAI-compatible HTTP app: routes, limits and server-sent-event streaming.

One generation runs at a time (engines are not thread-safe and each already uses every
thread it was given); up to `max_concurrent` requests are admitted and wait their turn,
further ones get 429 at once instead of queueing without bound. A request's slot is freed
by the response itself, so a client that disconnects mid-stream frees it too.

Refusals and bugs are answered as errors.py says: a 4xx naming the field, or a JSON 500.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wftool.serve.decoding_options import available_decodings, request_decoding
from wftool.serve.errors import (INTERNAL_ERROR, ApiError, LastResort, log, unreadable_json,
                                 validation_error)
from wftool.serve.generation import Engine, Generation, Sampling, generate
from wftool.serve.protocol import ChatCompletionRequest, CompletionRequest

# OpenAI's default for /v1/completions; chat completions default to the server's limit.
COMPLETION_DEFAULT_TOKENS = 16


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    max_prompt_tokens: int
    max_concurrent: int
    max_body_bytes: int = 1 << 20


class Admission:
    """Counts requests in flight; refuses more than `limit`."""

    def __init__(self, limit: int):
        self.limit, self.active, self._lock = limit, 0, threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise ApiError(429, f"the server is busy ({self.limit} requests in flight); "
                               "retry shortly", code="server_busy", kind="rate_limit_error")
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


class BodySizeLimit:
    """ASGI middleware: reads the request body first and refuses it past `limit` bytes,
    whether announced by Content-Length or sent chunked."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                error = ApiError(413, f"request body over {self.limit} bytes")
                return await error.response()(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on: the disconnect notice
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class AdmittedStream(StreamingResponse):
    """A streamed answer that closes its generators and frees its admission slot when the
    response ends for any reason: finished, failed, or the client gone."""

    def __init__(self, events: Iterator[str], closers: list[Callable[[], None]]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._closers = closers

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for close in self._closers:
                close()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: Engine, model_id: str, backend: str, limits: Limits) -> FastAPI:
    app = FastAPI(title="wft", description=f"OpenAI-compatible API serving {model_id}",
                  docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, limit=limits.max_body_bytes)
    app.add_middleware(LastResort)  # added last: wraps the rest
    admission = Admission(limits.max_concurrent)
    engine_lock = threading.Lock()
    model_card = {"id": model_id, "object": "model", "created": int(time.time()),
                  "owned_by": "wft"}
    decodings = available_decodings(engine, backend)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        return validation_error(list(err.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        if err.status_code == 400 and err.__cause__ is not None:  # FastAPI's json.loads failed
            return ApiError(400, unreadable_json(err.__cause__)).response()
        code = "not_found" if err.status_code == 404 else None
        return ApiError(err.status_code, str(err.detail), code=code).response()

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "backend": backend,
                "decoding": decodings, "requests_in_flight": admission.active}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        _check_model(name)
        return model_card

    def _check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"model '{name}' is not served here; this server serves "
                           f"'{model_id}'", param="model", code="model_not_found")

    def _prepare(body, prompt: str, chat: bool, default_tokens: int) -> Generation:
        field = "messages" if chat else "prompt"
        decoding = request_decoding(body, engine, backend)
        ids = engine.encode(prompt, chat)
        if not ids:
            raise ApiError(400, f"{field}: empty prompt", param=field)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at "
                           f"most {limits.max_prompt_tokens}", param=field,
                           code="context_length_exceeded")
        room = engine.context_length - len(ids)
        if room <= 0:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, the model's context is "
                           f"{engine.context_length}", param=field,
                           code="context_length_exceeded")
        wanted = body.requested_tokens
        if wanted is not None and wanted > limits.max_tokens:
            name = "max_completion_tokens" if body.max_completion_tokens is not None \
                else "max_tokens"
            raise ApiError(400, f"{name} {wanted} is over this server's limit of "
                           f"{limits.max_tokens}", param=name)
        max_tokens = min(default_tokens if wanted is None else wanted, room)
        sampling = Sampling(body.temperature, body.top_p, body.seed)
        return Generation(ids, max_tokens, sampling, body.stops, chat, decoding)

    def _pieces(generation: Generation) -> Iterator:
        with engine_lock:
            yield from generate(engine, generation)

    def _usage(generation: Generation) -> dict:
        prompt = len(generation.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": generation.completion_tokens,
                "total_tokens": prompt + generation.completion_tokens}

    def _answer(body, render_prompt: Callable[[], str], chat: bool, default_tokens: int):
        """Admit the request, then answer it whole or as a stream."""
        admission.enter()
        handed_over = False
        try:
            generation = _prepare(body, render_prompt(), chat, default_tokens)
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    "created": int(time.time()), "model": model_id}
            pieces = _pieces(generation)
            if body.stream:
                events = _events(pieces, generation, head, chat, body.include_usage)
                handed_over = True
                return AdmittedStream(events, [events.close, pieces.close, admission.leave])
            return _whole(pieces, generation, head, chat)
        finally:
            if not handed_over:
                admission.leave()

    def _whole(pieces, generation: Generation, head: dict, chat: bool) -> dict:
        text, finish = [], None
        for piece in pieces:
            text.append(piece.text)
            finish = piece.finish_reason or finish
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": "".join(text), "finish_reason": finish,
                      "logprobs": None}
        kind = "chat.completion" if chat else "text_completion"
        return {**head, "object": kind, "choices": [choice], "usage": _usage(generation)}

    def _events(pieces, generation: Generation, head: dict, chat: bool,
                include_usage: bool) -> Iterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            return _sse({**head, "object": kind, "choices": [choice]})

        try:
            if chat:
                yield _sse({**head, "object": kind, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None}]})
            for piece in pieces:
                if piece.text:
                    yield chunk(piece.text, None)
                if piece.finish_reason:
                    yield chunk(None, piece.finish_reason)
            if include_usage:
                yield _sse({**head, "object": kind, "choices": [], "usage": _usage(generation)})
        except Exception:  # headers are sent: report in-band, as OpenAI does
            log.exception("bug: generation failed mid-stream")
            yield _sse(INTERNAL_ERROR.body())
        yield _sse("[DONE]")

    def _chat_prompt(body: ChatCompletionRequest) -> str:
        from jinja2 import TemplateError

        if not engine.chat_template:
            raise ApiError(400, f"'{model_id}' has no chat template; use /v1/completions",
                           param="messages")
        try:
            return engine.render_chat(body.template_messages())
        except TemplateError as err:  # templates reject e.g. two user turns in a row
            raise ApiError(400, f"messages: the chat template refused them: {err}",
                           param="messages") from None

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        _check_model(body.model)
        return _answer(body, lambda: body.prompt, False,
                       min(COMPLETION_DEFAULT_TOKENS, limits.max_tokens))

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest):
        _check_model(body.model)
        return _answer(body, lambda: _chat_prompt(body), True, limits.max_tokens)

    return app
