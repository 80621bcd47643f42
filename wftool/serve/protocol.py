"""OpenAI API request bodies wft accepts, validated before anything reaches a model.

Unknown fields are ignored (clients send many); fields that would change the answer in a
way wft does not implement (n > 1, logprobs, echo, penalties, logit_bias, tools, JSON
response formats) are refused with a 400 naming the field rather than silently dropped.
`model` is only ever compared with the served model's id: no request can name a file.

Types are strict: a boolean is `true` or `false` (not "yes" or 1), an integer is not `2.0`
or `true`, and numbers are finite (Python's json reads `NaN` and `Infinity`).
`null` for an optional field asks for its default, as OpenAI's schema allows.

Beyond OpenAI's fields, `decoding` picks how a unified student (`wft unified`) decodes:
"ar" (the default), "diffusion" or "speculative", tuned by `diffusion_block_size`,
`diffusion_threshold` and `diffusion_steps_per_block` (defaults: the student's own). What
the served model and backend allow is checked in decoding_options.py. Text must be
valid Unicode: JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer encodes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

# The most stop sequences a request may give (OpenAI's limit).
MAX_STOPS = 4
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _only(accepted: str, ok) -> AfterValidator:
    """A field wft accepts with one meaning only; anything else is refused, naming it."""

    def check(value):
        if not ok(value):
            raise ValueError(f"not supported by this server (accepted: {accepted})")
        return value

    return AfterValidator(check)


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone UTF-16 surrogate ({value[err.start]!r} at character "
                         f"{err.start}), which is not text; send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
_EMPTY = _only("omit it", lambda v: not v)
_ZERO = _only("0", lambda v: v == 0)
_ONE = _only("1", lambda v: v == 1)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = _STRICT

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[Text, list[Text], None] = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, _ONE] = 1
    frequency_penalty: Annotated[float, _ZERO] = 0.0
    presence_penalty: Annotated[float, _ZERO] = 0.0
    logit_bias: Annotated[Any, _EMPTY] = None
    logprobs: Annotated[Any, _EMPTY] = None
    top_logprobs: Annotated[Any, _EMPTY] = None
    decoding: Literal["ar", "diffusion", "speculative"] = "ar"
    diffusion_block_size: int | None = Field(None, ge=1)
    diffusion_threshold: float | None = Field(None, ge=0.0, le=1.0)
    diffusion_steps_per_block: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
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
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Union[Text, list[Text]]
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
    model_config = _STRICT

    type: Annotated[str, _only('"text"', lambda v: v == "text")]  # no images, audio, files
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]

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
