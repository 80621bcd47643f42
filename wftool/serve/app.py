"""The OpenAI-compatible HTTP app: routes, limits, errors and server-sent-event streaming.

One generation runs at a time (engines are not thread-safe and each already uses every
thread it was given); up to `max_concurrent` requests are admitted and wait their turn,
further ones get 429 at once instead of queueing without bound.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wftool.serve.generation import Engine, Generation, Sampling, generate
from wftool.serve.protocol import ChatCompletionRequest, CompletionRequest

# OpenAI's default for /v1/completions; chat completions default to the server's limit.
COMPLETION_DEFAULT_TOKENS = 16
# Request fields with only one accepted value here, and what that value is.
UNSUPPORTED = {"n": "one choice per request", "best_of": "1 only", "echo": "false only",
               "logprobs": "omit it", "suffix": "omit it", "tools": "omit it",
               "frequency_penalty": "0 only", "presence_penalty": "0 only"}


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_concurrent: int = 4
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


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


def _field_path(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(engine: Engine, model_id: str, backend: str, limits: Limits) -> FastAPI:
    app = FastAPI(title="wft", description=f"OpenAI-compatible API serving {model_id}",
                  docs_url=None, redoc_url=None)
    admission = Admission(limits.max_concurrent)
    engine_lock = threading.Lock()
    created = int(time.time())

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return _error(ApiError(413, f"request body over {limits.max_body_bytes} bytes"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, err: RequestValidationError):
        first = err.errors()[0]
        field = _field_path(first.get("loc", ()))
        message = first.get("msg", "invalid value")
        if field in UNSUPPORTED:
            message = f"not supported by this server ({UNSUPPORTED[field]})"
        return _error(ApiError(400, f"{field}: {message}", param=field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return _error(ApiError(err.status_code, str(err.detail), code="not_found"
                               if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        return _error(ApiError(500, f"generation failed: {type(err).__name__}: {err}",
                               kind="server_error"))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "backend": backend,
                "requests_in_flight": admission.active}

    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "wft"}

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

    def _prepare(request, prompt: str, chat: bool, default_tokens: int) -> Generation:
        ids = engine.encode(prompt, chat)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{limits.max_prompt_tokens}", param="prompt" if not chat else
                           "messages", code="context_length_exceeded")
        room = engine.context_length - len(ids)
        if room <= 0:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, the model's context is "
                           f"{engine.context_length}", code="context_length_exceeded")
        wanted = request.requested_tokens
        if wanted is not None and wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens {wanted} is over this server's limit of "
                           f"{limits.max_tokens}", param="max_tokens")
        max_tokens = min(default_tokens if wanted is None else wanted, room)
        sampling = Sampling(request.temperature, request.top_p, request.seed)
        return Generation(ids, max_tokens, sampling, request.stops, chat)

    def _run(generation: Generation) -> Iterator:
        """Pieces of one admitted generation; releases its admission when done."""
        try:
            with engine_lock:
                yield from generate(engine, generation)
        finally:
            admission.leave()

    def _usage(generation: Generation) -> dict:
        prompt = len(generation.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": generation.completion_tokens,
                "total_tokens": prompt + generation.completion_tokens}

    def _respond(request, generation: Generation, chat: bool):
        admission.enter()
        pieces = _run(generation)
        prefix = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_id}
        if request.stream:
            return StreamingResponse(_events(pieces, generation, head, chat, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
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
        obj = "chat.completion" if chat else "text_completion"
        return {**head, "object": obj, "choices": [choice], "usage": _usage(generation)}

    def _events(pieces, generation, head, chat, request) -> Iterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict, **extra) -> str:
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice], **extra})}\n\n"

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None})
            for piece in pieces:
                if piece.text:
                    delta = {"content": piece.text} if chat else None
                    yield event({"index": 0, "finish_reason": None,
                                 **({"delta": delta} if chat else
                                    {"text": piece.text, "logprobs": None})})
                if piece.finish_reason:
                    yield event({"index": 0, "finish_reason": piece.finish_reason,
                                 **({"delta": {}} if chat else {"text": "", "logprobs": None})})
            if request.include_usage:
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': _usage(generation)})}\n\n"
        except Exception as err:  # headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps(ApiError(500, f'generation failed: {err}', kind='server_error').body())}\n\n"
        finally:
            pieces.close()
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        _check_model(request.model)
        generation = _prepare(request, request.prompt, False, COMPLETION_DEFAULT_TOKENS)
        return _respond(request, generation, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest):
        _check_model(request.model)
        if not engine.chat_template:
            raise ApiError(400, f"'{model_id}' has no chat template; use /v1/completions",
                           param="messages")
        prompt = engine.render_chat(request.template_messages())
        generation = _prepare(request, prompt, True, limits.max_tokens)
        return _respond(request, generation, chat=True)

    return app


def _error(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)
