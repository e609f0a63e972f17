"""Chat prompt formats, as data: one `PromptFormat` row per LM family, one `PromptBuilder` for all.

The builder keeps the seeds' API (`add_turn(role, message)`, `get_prompt()`, `get_potential_prompt()`)
so scripts written for Cobra / ML-Mamba port unchanged. Strings verified against Cobra's
`zephyr_prompter.py` and `mamba_prompter.py` (prompts are not right-stripped since Cobra's
2024-05-23 change, so a prompt ends with the assistant marker's newline).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    human: str  # template with {msg}: a user turn, up to where the answer starts
    eos: str  # closes every answer (and is what generation stops on)
    system: str = ""  # put before the first user turn
    turn_sep: str = "\n"  # put before every user turn after the first
    allow_system_prompt: bool = False  # Cobra's zephyr builder forces an empty system prompt

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


class PromptBuilder:
    def __init__(self, fmt: PromptFormat | str, system_prompt: str | None = None, keep_image: bool = False):
        self.keep_image = keep_image  # models that take the image where the prompt says `<image>`
        self.format = PROMPT_FORMATS[fmt] if isinstance(fmt, str) else fmt
        if system_prompt is not None and not self.format.allow_system_prompt and system_prompt != "":
            raise ValueError("this prompt format has no system prompt (the model was trained without one)")
        self.system = self.format.system if system_prompt is None else system_prompt
        self.prompt, self.turn_count = "", 0

    def _clean(self, message: str) -> str:
        return (message if self.keep_image else message.replace("<image>", "")).strip()

    def _human(self, message: str) -> str:
        wrapped = self.format.human.format(msg=self._clean(message))
        return (self.system + wrapped) if self.turn_count == 0 else (self.format.turn_sep + wrapped)

    def add_turn(self, role: str, message: str) -> str:
        """Append a turn ('human' and 'gpt' alternate, human first); returns the text it added."""
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {self.turn_count} must be role {expected!r}, got {role!r}")
        wrapped = self._human(message) if role == "human" else self.format.gpt(self._clean(message))
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
    (messages: the system prompt, then user / assistant turns; `<image>` stays where the image goes)."""

    def __init__(self, template: str, system_prompt: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)
        self.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.turn_count = 0

    def add_turn(self, role: str, message: str) -> str:
        expected = "human" if self.turn_count % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {self.turn_count} must be role {expected!r}, got {role!r}")
        self.messages.append({"role": "user" if role == "human" else "assistant", "content": message.strip()})
        self.turn_count += 1
        return message

    def _render(self, messages) -> str:
        return self.template.render(messages=messages, add_generation_prompt=messages[-1]["role"] == "user")

    def get_prompt(self) -> str:
        return self._render(self.messages)

    def get_potential_prompt(self, message: str) -> str:
        if self.turn_count % 2:
            raise ValueError("the next turn is the model's ('gpt'), not a user message")
        return self._render([*self.messages, {"role": "user", "content": message.strip()}])


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
