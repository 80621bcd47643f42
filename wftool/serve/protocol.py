"""OpenAI API request bodies wft accepts, validated before anything reaches a model.

Unknown fields are ignored (clients send many); fields that would change the answer in a
way wft does not implement (n > 1, logprobs, echo, penalties) are refused with a 400
rather than silently dropped. `model` is only ever compared with the served model's id:
no request can name a file to load.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported")
    stream_options: dict | None = None

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
    echo: Literal[False] = False
    logprobs: None = Field(None, description="not supported")
    best_of: int = Field(1, ge=1, le=1)
    suffix: None = Field(None, description="not supported")

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
    logprobs: Literal[False, None] = Field(None, description="not supported")
    tools: None = Field(None, description="not supported")

    def template_messages(self) -> list[dict]:
        # "developer" is the newer name of "system"; templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in self.messages]
