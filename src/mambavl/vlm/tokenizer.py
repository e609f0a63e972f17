"""Text ↔ ids for the VLMs: a thin wrapper over a `tokenizers.Tokenizer`, from a hub repo's
tokenizer.json (the real LMs: GPT-NeoX BPE for Cobra / ML-Mamba) or built in code (the tiny presets:
byte-level, no merges, so it needs nothing from the network and encodes any text)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mambavl.checkpoints.files import CheckpointError, hub_file

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

    def encode_releasing_gil(self, text: str) -> list[int]:
        """The same ids as `encode`, letting other Python threads run meanwhile (tokenizers' `encode`
        holds the GIL throughout; its batch form does not): for servers that tokenize beside a busy
        thread."""
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder of one growing sequence of ids (see `StreamDecoder`)."""
        return StreamDecoder(self.tokenizer, decoders.DecodeStream(skip_special_tokens=skip_special_tokens))


@dataclass
class StreamDecoder:
    """The text each new id adds to a sequence, from a short window of the latest ids (`tokenizers`'
    `DecodeStream`): constant work per token, where decoding the whole answer again grows with its
    length. An id that ends inside a character (a byte-level piece of a longer UTF-8 sequence) adds
    nothing until the character is complete."""

    tokenizer: Tokenizer
    decoder: decoders.DecodeStream

    def step(self, token_id: int) -> str:
        return self.decoder.step(self.tokenizer, token_id) or ""


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
    """tokenizer.json of a hub repo (local cache first; offline and not cached: a HubUnavailable at once)."""
    return TextTokenizer(
        Tokenizer.from_file(str(hub_file(repo_id, "tokenizer.json", "the tokenizer (tokenizer.json)")))
    )


def tokenizer_file(path: str | Path, eos_token: str = EOS) -> TextTokenizer:
    """A local tokenizer.json, checked: present, readable by `tokenizers`, and holding `eos_token` (else
    answers would never end). Errors are CheckpointErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such tokenizer file; copy the model's tokenizer.json beside its weights"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for bad JSON and for unknown models alike
        raise CheckpointError(
            f"{path}: not a tokenizer file `tokenizers` can read ({e}); copy the model's tokenizer.json again"
        ) from e
    if tok.token_to_id(eos_token) is None:
        raise CheckpointError(
            f"{path}: has no {eos_token!r} token, the token that ends an answer; this tokenizer does not "
            "belong to the model (or the model's eos_token is wrong)"
        )
    return TextTokenizer(tok, eos_token)


def load_tokenizer(name: str, eos_token: str = EOS) -> TextTokenizer:
    """ "bytes" (built in), a local tokenizer.json, or a hub repo."""
    if name == "bytes":
        tok = byte_tokenizer()
    elif Path(name).is_file() or name.endswith(".json"):
        tok = tokenizer_file(name, eos_token)
    else:
        tok = hub_tokenizer(name)
    tok.eos_token = eos_token
    return tok


def hub_chat_template(repo_id: str) -> str:
    """The `chat_template` of a hub repo's tokenizer_config.json (what `apply_chat_template` renders)."""
    import json

    config = hub_file(repo_id, "tokenizer_config.json", "the chat template (tokenizer_config.json)")
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"{repo_id}: tokenizer_config.json has no chat_template")
    return template
