"""The OpenAI chat-completions request, as the server accepts it, and its translation into a prompt and
sampling settings. Fields that would change the output and that we do not implement are refused, never
ignored; fields that do not (e.g. `user`) are accepted."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mambavl.vlm.sampling import SamplingParams


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # extensions under vLLM's names
    top_k: int | None = Field(None, ge=0)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # OpenAI fields we do not implement: refused unless left at their no-op values
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, with why."""
        if self.logprobs or self.top_logprobs:
            return "logprobs are not supported"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.tools or self.functions:
            return "tool and function calling are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported"
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """OpenAI's settings as ours. Temperature 0 or omitted decodes greedily (the seeds' default);
        a positive temperature samples."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        sample = self.temperature is not None and self.temperature > 0
        return SamplingParams(
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_length=max_tokens if self.ignore_eos else min(self.min_tokens, max_tokens),
            stop=tuple(self.stop or ()),
            seed=self.seed,
        )


def parse_conversation(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """messages -> (system prompt, turns as (role, text) with 'human' / 'gpt' roles, image URLs).

    The system message may only come first; user and assistant turns alternate, starting and ending with
    the user. An image part becomes `<image>` in its turn's text (models that take the image first drop
    the marker; LLaVA-style ones put the image there)."""
    system = None
    turns: list[tuple[str, str]] = []
    images: list[str] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            if i != 0:
                raise ValueError(f"messages[{i}]: a {m.role} message may only come first")
            system = _text(m, i, images, allow_images=False)
            continue
        role = "human" if m.role == "user" else "gpt"
        expected = "human" if len(turns) % 2 == 0 else "gpt"
        if role != expected:
            want = "user" if expected == "human" else "assistant"
            raise ValueError(
                f"messages[{i}] is from the {m.role}, expected the {want}: turns alternate user / "
                "assistant, starting with the user"
            )
        turns.append((role, _text(m, i, images, allow_images=m.role == "user")))
    if not turns or turns[-1][0] != "human":
        raise ValueError("the last message must be the user's: it is what the model answers")
    return system, turns, images


def _text(m: Message, i: int, images: list[str], allow_images: bool) -> str:
    if m.content is None:
        raise ValueError(f"messages[{i}] has no content")
    if isinstance(m.content, str):
        return m.content
    pieces = []
    for part in m.content:
        if isinstance(part, TextPart):
            pieces.append(part.text)
        elif not allow_images:
            raise ValueError(f"messages[{i}]: only user messages may carry images")
        else:
            images.append(part.image_url.url)
            pieces.append("<image>")
    return "\n".join(pieces)
