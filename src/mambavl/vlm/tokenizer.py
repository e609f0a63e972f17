"""Text ↔ ids for the VLMs: a thin wrapper over a `tokenizers.Tokenizer`, from a hub repo's
tokenizer.json (the real LMs: GPT-NeoX BPE for Cobra / ML-Mamba) or built in code (the tiny presets:
byte-level, no merges, so it needs nothing from the network and encodes any text)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mambavl.checkpoints.files import hub_file

EOS = "<|endoftext|>"
# Chat markers of the prompt formats the tiny presets use (zephyr, ChatML): one id each, as a real chat
# tokenizer would have them, instead of a dozen bytes.
CHAT_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>")


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    eos_token: str = EOS

    @property
    def eos_token_id(self) -> int:
        token_id = self.tokenizer.token_to_id(self.eos_token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {self.eos_token!r} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def byte_tokenizer() -> TextTokenizer:
    """262 ids: `<|endoftext|>` = 0 (as in GPT-NeoX), the 256 byte symbols, then the chat markers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS: 0} | {ch: i + 1 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, *CHAT_MARKERS])
    return TextTokenizer(tok)


def numbered_tokenizer(vocab_size: int) -> TextTokenizer:
    """`<|endoftext|>` = 0 and words `w1` ... `w{vocab_size-1}`: a vocabulary of any size that needs
    nothing from the network, to serve and benchmark full-size models with random weights."""
    vocab = {EOS: 0} | {f"w{i}": i for i in range(1, vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    return TextTokenizer(tok)


def hub_tokenizer(repo_id: str) -> TextTokenizer:
    """tokenizer.json of a hub repo (local cache first)."""
    return TextTokenizer(Tokenizer.from_file(str(hub_file(repo_id, "tokenizer.json"))))


def load_tokenizer(name: str, eos_token: str = EOS) -> TextTokenizer:
    """ "bytes" (built in), a local tokenizer.json, or a hub repo."""
    from pathlib import Path

    if name == "bytes":
        tok = byte_tokenizer()
    elif Path(name).is_file():
        tok = TextTokenizer(Tokenizer.from_file(name))
    else:
        tok = hub_tokenizer(name)
    tok.eos_token = eos_token
    return tok


def hub_chat_template(repo_id: str) -> str:
    """The `chat_template` of a hub repo's tokenizer_config.json (what `apply_chat_template` renders)."""
    import json

    template = json.loads(hub_file(repo_id, "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"{repo_id}: tokenizer_config.json has no chat_template")
    return template
