"""OpenAI API request bodies wft accepts, validated before anything reaches a model.

Unknown fields are ignored (clients send many); fields that would change the answer in a
way wft does not implement (n > 1, logprobs, echo, penalties, logit_bias, tools, JSON
response formats) are refused with a 400 naming the field rather than silently dropped.
`model` is only ever compared with the served model's id: no request can name a file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _only(accepted: str, ok) -> AfterValidator:
    """A field wft accepts with one meaning only; anything else is refused, naming it."""

    def check(value):
        if not ok(value):
            raise ValueError(f"not supported by this server (accepted: {accepted})")
        return value

    return AfterValidator(check)


_EMPTY = _only("omit it", lambda v: not v)
_ZERO = _only("0", lambda v: v == 0)
_ONE = _only("1", lambda v: v == 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    n: Annotated[int, _ONE] = 1
    frequency_penalty: Annotated[float, _ZERO] = 0.0
    presence_penalty: Annotated[float, _ZERO] = 0.0
    logit_bias: Annotated[Any, _EMPTY] = None
    logprobs: Annotated[Any, _EMPTY] = None
    top_logprobs: Annotated[Any, _EMPTY] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @property
    def stops(self) -> list[str]:
        return [s for s in (self.stop or []) if s]

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: Annotated[bool, _only("false", lambda v: not v)] = False
    best_of: Annotated[int, _ONE] = 1
    suffix: Annotated[Any, _EMPTY] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request")
            return value[0]
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Annotated[Any, _EMPTY] = None
    functions: Annotated[Any, _EMPTY] = None
    tool_choice: Annotated[Any, _only("none", lambda v: v in (None, "none"))] = None
    response_format: Annotated[Any, _only('{"type": "text"}',
                                          lambda v: not v or (isinstance(v, dict)
                                                          and v.get("type") == "text"))] = None

    def template_messages(self) -> list[dict]:
        # "developer" is the newer name of "system"; templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in self.messages]
