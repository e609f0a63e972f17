"""`mambavl chat`: a conversation about one image in the terminal, the answers streamed as they are
generated. `ChatSession` holds the state (model, image, history, sampling); `run_chat` is the loop."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from dataclasses import fields

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mambavl.vision import load_image
from mambavl.vlm.model import VLM
from mambavl.vlm.sampling import SamplingParams

# The sampling settings a chat can change (`/params`); the others keep SamplingParams' defaults.
CHAT_PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
_TYPES = typing.get_type_hints(SamplingParams)
_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

HELP = """\
commands:
  /image PATH        talk about another image (starts a new conversation)
  /reset             start a new conversation (keeps the image)
  /params            show the sampling settings
  /params k=v ...    change them, e.g. /params do_sample=true temperature=0.7 top_p=0.9 seed=1
  /help              this list
  /quit, /exit       leave (so do Ctrl-D, and Ctrl-C at the prompt)
anything else is a message to the model; Ctrl-C stops an answer (a stopped answer is not kept)."""


class ChatSession:
    """A conversation with `vlm` about one image (or none). `system_prompt` goes where the model's prompt
    format has a system slot, else it is folded into the first message as `{system}\n\n{message}`
    (`VLM.get_prompt_builder`).

    The history holds finished exchanges only: an answer stopped early (Ctrl-C) is dropped with its
    question, so the next message is asked as if the stopped one had never been sent.
    """

    def __init__(self, vlm: VLM, system_prompt: str | None = None, params: dict | None = None):
        self.vlm = vlm
        self.system_prompt = system_prompt
        self.image = None  # a PIL image, or None: text only
        self.image_path: str | None = None
        self.params = {k: _DEFAULTS[k] for k in CHAT_PARAMS}
        self.update_params(params or {})
        self.conversation = vlm.get_prompt_builder(system_prompt)

    @property
    def turns(self) -> int:
        """Finished exchanges (question and answer) in the history."""
        return self.conversation.turn_count // 2

    def ask(self, message: str) -> Iterator[str]:
        """Streams the answer to `message`; once it has finished, the exchange joins the history."""
        if self.turns == 0 and self._needs_marker(message):
            message = f"<image>\n{message}"
        prompt = self.conversation.get_potential_prompt(message)  # = add_turn("human") + get_prompt()
        pieces: list[str] = []
        for piece in self.vlm.stream(self.image, prompt, **self.params):
            if not pieces:
                piece = piece.lstrip()  # as `generate` strips its text
                if not piece:
                    continue
            pieces.append(piece)
            yield piece
        self.conversation.add_turn("human", message)
        self.conversation.add_turn("gpt", "".join(pieces))

    def _needs_marker(self, message: str) -> bool:
        # Models that take the image at `<image>` (Viper) need the marker once, in the first message.
        placeholder = self.vlm.config.image_placement == "placeholder"
        return placeholder and self.image is not None and "<image>" not in message

    def set_image(self, path: str) -> bool:
        """Loads the image at `path` (raises `ImageError`). The image comes first in the prompt, so a new
        image starts a new conversation; returns whether a history was cleared."""
        self.image = load_image(path, self.vlm.config.max_pixels)
        self.image_path = str(path)
        cleared = self.turns > 0
        self.reset()
        return cleared

    def reset(self) -> None:
        """Forgets the history; the image stays."""
        self.conversation = self.vlm.get_prompt_builder(self.system_prompt)

    def set_params(self, text: str) -> None:
        """Parses 'key=value ...' (e.g. 'temperature=0.7 do_sample=true') and applies it all or, on any
        bad key or value, nothing (ValueError with a message for the user)."""
        given = {}
        for item in text.split():
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"expected key=value, got {item!r}")
            if key not in CHAT_PARAMS:
                raise ValueError(f"unknown setting {key!r}; the settings are {', '.join(CHAT_PARAMS)}")
            given[key] = _parse(key, value)
        self.update_params(given)

    def update_params(self, given: dict) -> None:
        """Applies typed settings after SamplingParams has accepted them together with the others."""
        unknown = sorted(set(given) - set(CHAT_PARAMS))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; the settings are {', '.join(CHAT_PARAMS)}")
        params = self.params | given
        SamplingParams(**params)  # its ValueError says which value is wrong and what it must be
        self.params = params


def _parse(key: str, text: str):
    """`text` as the type of SamplingParams' field `key` (bool, int, float, or int | None)."""
    kinds = typing.get_args(_TYPES[key]) or (_TYPES[key],)
    if type(None) in kinds and text.lower() == "none":
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{key}={text!r} is not a truth value: use true or false")
    try:
        return kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number"}[kind]
        extra = " or none" if type(None) in kinds else ""
        raise ValueError(f"{key}={text!r} is not {what}{extra}") from None


def params_table(params: dict) -> Table:
    table = Table(title="sampling", show_header=False)
    for key, value in params.items():
        table.add_row(key, str(value))
    return table


def run_chat(session: ChatSession, console: Console, read_line: Callable[[], str]) -> None:
    """The REPL: reads lines with `read_line` (EOFError at the end of input) until /quit, Ctrl-D or
    Ctrl-C at the prompt. Bad input is reported and the loop goes on."""
    image = f"image {session.image_path}" if session.image_path else "no image (/image PATH)"
    console.print(
        f"chatting with {session.vlm.config.name}, {image}; /help lists the commands",
        markup=False,
        highlight=False,
    )
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if not line.startswith("/"):
            _answer(session, console, line)
            continue
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if command in ("/quit", "/exit"):
                return
            if not _command(session, console, command, rest):
                console.print(f"[red]error:[/red] unknown command {escape(repr(command))}", highlight=False)
                console.print(HELP, markup=False, highlight=False)
        except ValueError as e:  # ImageError is one: bad paths, bad settings
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)


def _command(session: ChatSession, console: Console, command: str, rest: str) -> bool:
    """Runs one /command; False when there is no such command."""
    if command == "/help":
        console.print(HELP, markup=False, highlight=False)
    elif command == "/reset":
        session.reset()
        console.print("new conversation")
    elif command == "/params":
        if rest:
            session.set_params(rest)
        console.print(params_table(session.params))
    elif command == "/image":
        if not rest:
            raise ValueError("usage: /image PATH")
        path = rest[1:-1] if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "'\"" else rest
        cleared = session.set_image(path)
        w, h = session.image.size
        note = "; new conversation" if cleared else ""
        console.print(f"image {path} ({w}×{h}){note}", markup=False, highlight=False)
    else:
        return False
    return True


def _answer(session: ChatSession, console: Console, message: str) -> None:
    console.print("[bold cyan]model>[/bold cyan] ", end="")
    answer = session.ask(message)
    empty = True
    try:
        for piece in answer:
            # the model's text as is: no markup, emoji codes or highlighting, no wrapping inserted
            console.print(piece, end="", markup=False, highlight=False, emoji=False, soft_wrap=True)
            console.file.flush()
            empty = False
    except KeyboardInterrupt:
        console.print("\n[dim](stopped: this answer is not kept)[/dim]")
        return
    except ValueError as e:  # e.g. the conversation has outgrown the model's length
        console.print(
            f"\n[red]error:[/red] {escape(str(e))}; /reset starts a new conversation", highlight=False
        )
        return
    finally:
        answer.close()
    console.print("[dim](no answer)[/dim]" if empty else "")
