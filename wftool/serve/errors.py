"""OpenAI's error bodies: every refused request gets a 4xx naming the field, every bug a
500 that says nothing of its cause to the client and logs its traceback once.

`validation_error` says what pydantic refused in the request's JSON terms ("messages[0].
content: must be a string or an array"), naming the deepest field that went wrong.
"""

from __future__ import annotations

import logging
import re

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

# Pydantic names union members in error locations ("prompt.str"); clients want the field.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|dict|list|none|[\w-]+\[.*\])$")
# What a value of the wrong JSON type should have been, by pydantic's error type.
_EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
# uvicorn's own logger, so a bug's traceback reads like the server's other errors.
log = logging.getLogger("uvicorn.error")


class ApiError(Exception):
    """A refused request: raised anywhere in a handler, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        # A message may quote the request (a model name); a lone surrogate there cannot be
        # sent as UTF-8.
        message = message.encode("utf-8", "replace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


INTERNAL_ERROR = ApiError(500, "the server failed on this request (a bug, logged on the "
                          "server)", kind="server_error")


class LastResort:
    """ASGI middleware, outermost: an exception that no handler turned into an answer is
    logged with its traceback and becomes a JSON 500 that does not describe it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception:
            log.exception("bug: %s %s failed", scope.get("method"), scope.get("path"))
            if not started:  # else the client sees the response cut short
                await INTERNAL_ERROR.response()(scope, receive, send)


def _field_path(loc) -> str:
    """`messages[0].content` from pydantic's ("body", "messages", 0, "content", "str")."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_MEMBER.match(part):
            path += f".{part}" if path else part
    return path or "body"


def unreadable_json(cause: BaseException) -> str:
    """Why a body that is JSON syntax failed to load: errors besides JSONDecodeError."""
    if isinstance(cause, UnicodeDecodeError):
        why = "it is not UTF-8 text"
    elif isinstance(cause, RecursionError):
        why = "it nests too deep"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        why = "it holds an integer too long to read"
    else:
        why = "it could not be read"
    return f"the request body is not valid JSON: {why}"


def validation_error(errors: list[dict]) -> ApiError:
    """One 400 for a request pydantic refused, naming the field that is wrong."""
    if not errors:
        return ApiError(400, "invalid request")
    # A union field reports one error per member; the deepest is where the value went wrong
    # (a list with one bad item), the first among equals is the simplest reading.
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    kind = error.get("type")
    if kind == "json_invalid":
        why = (error.get("ctx") or {}).get("error", "JSON decode error")
        return ApiError(400, f"the request body is not valid JSON: {why} at character "
                        f"{error['loc'][-1]}")
    field = _field_path(error.get("loc", ()))
    if field == "body":
        return ApiError(400, "the request body must be a JSON object, sent with "
                        "Content-Type: application/json")
    if kind == "missing":
        message = "is required"
    elif kind == "string_unicode":  # a Literal field given a lone surrogate
        message = "holds a lone UTF-16 surrogate, which is not text; send valid Unicode"
    elif kind in _EXPECTED:  # a union field says what each of its members takes
        expected = [_EXPECTED[e["type"]] for e in errors if e.get("type") in _EXPECTED
                    and _field_path(e.get("loc", ())) == field]
        message = "must be " + " or ".join(dict.fromkeys(expected))
    else:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        message = message.replace("Input should be", "must be")
    return ApiError(400, f"{field}: {message}", param=field)
