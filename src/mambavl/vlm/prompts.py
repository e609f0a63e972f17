"""Chat prompt formats, as data: one `PromptFormat` row per LM family, one `PromptBuilder` for all.

The builder keeps the seeds' API (`add_turn(role, message)`, `get_prompt()`, `get_potential_prompt()`)
so scripts written for Cobra / ML-Mamba port unchanged. Strings verified against Cobra's
`zephyr_prompter.py` and `mamba_prompter.py` (prompts are not right-stripped since Cobra's
2024-05-23 change, so a prompt ends with the assistant marker's newline).

System text. A format with a system slot (Viper's chat templates) puts the system prompt there. Cobra and
ML-Mamba were trained without one (their zephyr builder forces it empty; the In:/Out: format has none), so
there the system text is folded into the first user message: the model sees `{system}\n\n{message}`, each
stripped and with `<image>` removed as every message is, exactly as if the user had typed that text.
`add_system(text)` folds text into the next user message on every format (a system message in the middle
of a conversation). Empty or blank system text adds nothing. Without system text, the prompts are the
seeds' strings, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    human: str  # template with {msg}: a user turn, up to where the answer starts
    eos: str  # closes every answer (and is what generation stops on)
    system: str = ""  # put before the first user turn
    turn_sep: str = "\n"  # put before every user turn after the first
    # Whether the model was trained with a system prompt before the first turn. Cobra's zephyr builder
    # forces an empty one, so system text is folded into the first user message instead.
    allow_system_prompt: bool = False

    def gpt(self, msg: str) -> str:
        return f"{msg if msg != '' else ' '}{self.eos}"


PROMPT_FORMATS: dict[str, PromptFormat] = {
    # Cobra, mamba-2.8b-zephyr (havenhq/mamba-chat's format)
    "zephyr": PromptFormat(human="<|user|>\n{msg}<|endoftext|>\n<|assistant|>\n", eos="<|endoftext|>"),
    # Cobra's MambaPromptBuilder, for base Mamba LMs
    "mamba": PromptFormat(human="In: {msg}\nOut: ", eos="<|endoftext|>"),
}


def prompt_format_for(llm_id: str) -> str:
    """Cobra's rule: an LM id ending in 'zephyr' chats in zephyr format; other Mamba LMs use In:/Out:."""
    return "zephyr" if llm_id.endswith("zephyr") else "mamba"


def fold_system(system: str, message: str) -> str:
    """System text folded into a user message: `{system}\n\n{message}` (either part may be empty; both are
    already cleaned). Equal to the user typing that text, since a message is stripped before it is used."""
    return "\n\n".join(part for part in (system, message) if part)


class PromptBuilder:
    """A conversation in one of `PROMPT_FORMATS`. `system_prompt` goes into the format's system slot where it
    has one, else it is folded into the first user message (see the module docstring)."""

    def __init__(self, fmt: PromptFormat | str, system_prompt: str | None = None, keep_image: bool = False):
        self.keep_image = keep_image  # models that take the image where the prompt says `<image>`
        self.format = PROMPT_FORMATS[fmt] if isinstance(fmt, str) else fmt
        slotted = self.system_slot and system_prompt is not None
        self.system = system_prompt if slotted else self.format.system
        self.pending = "" if slotted else self._clean(system_prompt or "")  # folded into the next user turn
        self.prompt, self.turn_count = "", 0

    @property
    def system_slot(self) -> bool:
        """Whether system text has a place of its own in this format (else it is folded into a user turn)."""
        return self.format.allow_system_prompt

    def _clean(self, message: str) -> str:
        return (message if self.keep_image else message.replace("<image>", "")).strip()

    def _human(self, message: str) -> str:
        wrapped = self.format.human.format(msg=fold_system(self.pending, self._clean(message)))
        return (self.system + wrapped) if self.turn_count == 0 else (self.format.turn_sep + wrapped)

    def add_system(self, text: str) -> None:
        """Folds `text` into the next user message as `{text}\n\n{message}` (after any system text already
        waiting for it). The seeds' builders have no such call; it is how a system message that comes
        after the first turn reaches the model."""
        self.pending = fold_system(self.pending, self._clean(text))

    def add_turn(self, role: str, message: str) -> str:
        """Append a turn ('human' and 'gpt' alternate, human first); returns the text it added."""
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {self.turn_count} must be role {expected!r}, got {role!r}")
        wrapped = self._human(message) if role == "human" else self.format.gpt(self._clean(message))
        if role == "human":
            self.pending = ""
        self.prompt += wrapped
        self.turn_count += 1
        return wrapped

    def get_potential_prompt(self, message: str) -> str:
        """The prompt if `message` were the next user turn. (The seeds' version skips the separator and
        keeps '<image>' on later turns, unlike `add_turn`; ours matches what `add_turn` would produce.)"""
        if self.turn_count % 2:
            raise ValueError("the next turn is the model's ('gpt'), not a user message")
        return self.prompt + self._human(message)

    def get_prompt(self) -> str:
        return self.prompt


# A ChatML template for the tiny chat-template presets (the real ones use their tokenizer's own).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatTemplateBuilder:
    """Prompts rendered by a jinja chat template, as Viper does through `tokenizer.apply_chat_template`
    (messages: the system prompt, then user / assistant turns; `<image>` stays where the image goes).
    The system prompt has its own message; `add_system` folds text into the next user message."""

    system_slot = True

    def __init__(self, template: str, system_prompt: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)
        self.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.pending = ""  # system text for the next user message
        self.turn_count = 0

    def add_system(self, text: str) -> None:
        """Folds `text` into the next user message as `{text}\n\n{message}` (a system message that comes
        after the first turn: chat templates put the system prompt first only)."""
        self.pending = fold_system(self.pending, text.strip())

    def add_turn(self, role: str, message: str) -> str:
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {self.turn_count} must be role {expected!r}, got {role!r}")
        if role == "human":
            message, self.pending = self._user(message), ""
        self.messages.append({"role": "user" if role == "human" else "assistant", "content": message.strip()})
        self.turn_count += 1
        return message

    def _user(self, message: str) -> str:
        return fold_system(self.pending, message.strip())

    def _render(self, messages) -> str:
        return self.template.render(messages=messages, add_generation_prompt=messages[-1]["role"] == "user")

    def get_prompt(self) -> str:
        return self._render(self.messages)

    def get_potential_prompt(self, message: str) -> str:
        if self.turn_count % 2:
            raise ValueError("the next turn is the model's ('gpt'), not a user message")
        return self._render([*self.messages, {"role": "user", "content": self._user(message)}])


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
