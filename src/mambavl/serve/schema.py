"""The OpenAI chat-completions request, as the server accepts it, and its translation into a prompt and
sampling settings. Fields that would change the output and that we do not implement are refused, never
ignored; fields that do not (e.g. `user`) are accepted."""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mambavl.vlm.sampling import SEED_END, SEED_MIN, SamplingParams

MAX_STOPS = 4
# The engine looks for every stop string in the answer, and for each of its prefixes at the answer's end,
# after every token: long ones would cost every stream on the server time.
MAX_STOP_CHARS = 256


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
    # Python's JSON reader takes NaN and Infinity: no sampling setting may be either.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)  # any 64-bit integer, signed or not
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
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"
            )
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


# What the server does with system text the model's prompt format has no place for (see `vlm.prompts`):
# fold it into the user's message (OpenAI clients send a system message by default), or refuse the request.
SYSTEM_MESSAGES = ("fold", "refuse")


class Turn(NamedTuple):
    role: str  # "human", "gpt", or "system": folded into the next user message
    text: str
    index: int  # where it is in the request's messages


def conversation_prompt(vlm, messages: list[Message], system_messages: str = "fold") -> tuple[str, list[str]]:
    """messages -> (the prompt in the model's format, image URLs).

    System and developer messages before the first user message make the system prompt (joined by blank
    lines): it goes where the prompt format has a system slot (Viper's chat templates), else it is folded
    into the first user message as `{system}\n\n{message}`. One after the first user message is folded into
    the next user message, on every format. Empty ones are ignored. With `system_messages="refuse"` any
    system text that would be folded is refused instead."""
    if system_messages not in SYSTEM_MESSAGES:
        raise ValueError(f"system_messages={system_messages!r}: expected one of {', '.join(SYSTEM_MESSAGES)}")
    system, turns, images = parse_conversation(messages)
    builder = vlm.get_prompt_builder(system)
    if system_messages == "refuse":
        _refuse_folding(system, turns, builder.system_slot)
    for turn in turns:
        if turn.role == "system":
            builder.add_system(turn.text)
        else:
            builder.add_turn(turn.role, turn.text)
    return builder.get_prompt(), images


def _refuse_folding(system: str | None, turns: list[Turn], system_slot: bool) -> None:
    fix = "put the instructions in the user's message, or start the server with --system-messages fold"
    if system is not None and not system_slot:
        raise ValueError(
            "this model's prompt format has no system prompt (it was trained without one) and this server "
            f"refuses to fold system messages into the user's message (--system-messages refuse): {fix}"
        )
    for turn in turns:
        if turn.role == "system":
            raise ValueError(
                f"messages[{turn.index}]: a system message after the first user message would be folded into "
                "the next user message, which this server refuses (--system-messages refuse): send system "
                f"messages first, or {fix}"
            )


def parse_conversation(messages: list[Message]) -> tuple[str | None, list[Turn], list[str]]:
    """messages -> (system prompt or None, turns, image URLs).

    The system prompt is the text of the system / developer messages before the first user message,
    joined by blank lines; later ones become "system" turns (folded into the next user message). Empty
    system messages are dropped. User and assistant turns alternate, starting and ending with the user.
    An image part becomes `<image>` in its turn's text (models that take the image first drop the marker;
    LLaVA-style ones put the image there)."""
    leading: list[str] = []
    turns: list[Turn] = []
    images: list[str] = []
    spoken = 0  # user and assistant turns so far
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            text = _text(m, i, images, allow_images=False)
            if not text.strip():
                continue
            if spoken:
                turns.append(Turn("system", text, i))
            else:
                leading.append(text)
            continue
        role = "human" if m.role == "user" else "gpt"
        expected = "human" if spoken % 2 == 0 else "gpt"
        if role != expected:
            want = "user" if expected == "human" else "assistant"
            raise ValueError(
                f"messages[{i}] is from the {m.role}, expected the {want}: turns alternate user / "
                "assistant, starting with the user"
            )
        turns.append(Turn(role, _text(m, i, images, allow_images=m.role == "user"), i))
        spoken += 1
    if turns and turns[-1].role == "system":
        raise ValueError(
            f"messages[{turns[-1].index}]: a {messages[turns[-1].index].role} message after the last user "
            "message has no user message to go with: send it before the user message it is for"
        )
    if not spoken or turns[-1].role != "human":
        raise ValueError("the last message must be the user's: it is what the model answers")
    return ("\n\n".join(leading) if leading else None), turns, images


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
