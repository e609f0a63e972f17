"""A language model as a stack of pre-norm residual blocks: embedding → [norm → mixer (+ norm → ffn)]×N
→ final norm → head. The mixer of a layer is Mamba-1, Mamba-2, attention, Mamba-2 and attention side by
side (Falcon-H1), or Mamba-2 fed by a shared attention + MLP block (Zamba2, `lm.shared`), chosen by the
config.

`lm(input_ids | inputs_embeds, state)` is the one call for training, prefill and decode: with a
state it continues from it and advances it, for any number of new tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambavl.lm.attention import Attention, attention_state
from mambavl.lm.config import LMConfig
from mambavl.lm.ffn import MLP, MoE
from mambavl.lm.init import init_weights
from mambavl.lm.linear import Head, Linear
from mambavl.lm.mamba1 import Mamba1Mixer
from mambavl.lm.mamba2 import Mamba2Mixer
from mambavl.lm.norm import RMSNorm
from mambavl.lm.parallel import ParallelMixer
from mambavl.lm.shared import SharedBlock
from mambavl.lm.state import LMState
from mambavl.runtime import to_device

MIXER_CLASSES = {
    "mamba1": Mamba1Mixer,
    "mamba2": Mamba2Mixer,
    "attention": Attention,
    "mamba2+attention": ParallelMixer,
    "shared+mamba2": Mamba2Mixer,  # with the layer's `linear` from a shared block (`Block.forward`)
}
FFN_CLASSES = {"mlp": MLP, "moe": MoE}


def _sublayer_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A norm's output as a sublayer takes it: in the weights' dtype, except that under autocast an input
    already in autocast's dtype stays there (its projections would round it back to it: a cast up and
    down again, and their gradients, for nothing)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype == torch.get_autocast_dtype(kind):
        return x
    return x.to(dtype)


# Multiple of positions that a training forward pads its rows to, at the end, when every layer is causal
# and per-position (Mamba mixers, MLPs): the Mamba-1 training kernels take time tiles of 16, and a row
# padded once at the embedding saves each layer a padded copy of its input and of its output's gradient.
PAD_MULTIPLE = 16
PADDABLE = ({"mamba1", "mamba2"}, {"mlp", "none"})


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, mixer: str, ffn: str):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.residual_multiplier = cfg.residual_multiplier  # Granite scales what each sublayer adds
        if mixer != "none":
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mixer = MIXER_CLASSES[mixer](cfg)
        else:  # a feed-forward block alone
            self.mixer = None
        # Zamba2: the shared block's output enters this layer's mixer through a linear of its own
        self.linear = Linear(cfg.d_model, cfg.d_model, bias=False) if mixer == "shared+mamba2" else None
        self.kv = (cfg.n_kv_heads, cfg.head_dim) if self.linear is not None else None
        if ffn != "none":
            self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn = FFN_CLASSES[ffn](cfg)
        else:
            self.ffn = None

    def new_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        state = {} if self.mixer is None else self.mixer.new_state(batch, device)
        if self.kv is not None:  # the shared block's attention keeps its KV cache per layer
            state |= attention_state(batch, *self.kv, device)
        return state

    def forward(
        self,
        out: torch.Tensor,
        residual: torch.Tensor | None,
        state: dict | None,
        dtype: torch.dtype,
        valid: torch.Tensor | None = None,
        shared: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous sublayer's output, residual stream before it) -> the same after this block. The add
        into the residual stream is fused with the norm that reads it (one kernel on GPUs). `shared`: for
        a shared+mamba2 layer, (its shared block, the use's index, the input embeddings)."""
        if self.linear is not None:
            block, use, embeddings = shared
            stream = out if residual is None else residual + out
            if self.residual_in_fp32:
                stream = stream.float()
            fed = self.linear(block(stream.to(dtype), embeddings, state, valid, use))
            x, _ = self.norm.add(fed, stream, self.residual_in_fp32)  # norm(stream + fed); the stream stays
            out, residual = self._scaled(self.mixer(_sublayer_input(x, dtype), state, valid)), stream
        elif self.mixer is not None:
            x, residual = self.norm.add(out, residual, self.residual_in_fp32)
            out = self._scaled(self.mixer(_sublayer_input(x, dtype), state, valid))
        if self.ffn is not None:
            x, residual = self.ffn_norm.add(out, residual, self.residual_in_fp32)
            out = self._scaled(self.ffn(_sublayer_input(x, dtype)))
        return out, residual

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier


class LanguageModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, m, f) for m, f in zip(config.mixers, config.ffns, strict=True)
        )
        # Zamba2's shared blocks (`lm.shared`), reused in turn by the shared+mamba2 layers
        self.shared = nn.ModuleList(SharedBlock(config, b) for b in range(config.shared_blocks))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Head(config.d_model, config.vocab_size, config.logits_scaling)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        init_weights(self)
        # Training: recompute each block in the backward pass instead of storing its activations.
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied head once

    def new_state(self, batch_size: int, device=None) -> LMState:
        """A zero state for `batch_size` new sequences (fp32; on the model's device by default)."""
        device = self.device if device is None else device
        return LMState([layer.new_state(batch_size, device) for layer in self.layers])

    def embed(self, input_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """The embeddings of token ids, checked against the vocabulary. A host list of ids is checked on
        the host and copied without waiting for the device (`runtime.to_device`): [T] -> [T, d_model]."""
        vocab = self.config.vocab_size
        if isinstance(input_ids, torch.Tensor):
            bounds = (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else None
        else:
            bounds = (min(input_ids), max(input_ids)) if input_ids else None
            input_ids = to_device(input_ids, self.embedding.weight.device)
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= vocab):
            raise ValueError(
                f"input_ids hold values in [{bounds[0]}, {bounds[1]}] but the vocabulary has {vocab} "
                "entries: use this model's tokenizer"
            )
        return self.embedding(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: LMState | None = None,
        return_hidden: bool = False,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or the final hidden states [B, T, d_model] with `return_hidden`).

        Ragged batches are right-padded, with `lengths` [B] giving each row's real tokens (0 ≤ n ≤ T).
        An SSM would otherwise run its padding through the scan and carry it in the state; here a
        padding position is an exact identity step (Δ = 0: decay 1, no input), each conv window ends at
        its row's last real token, and attention never sees padding keys. So the state after the call is
        each row's state after its real tokens, whatever the padding holds, and from any starting state
        (prefill or continuous batching alike). Logits at padding positions are meaningless.

        `mask` [B, T] bool (right padding) may stand for `lengths`: it is taken as given, unchecked, so the
        call reads nothing back from the GPU and can be captured in a CUDA graph (`vlm.prefill_graphs`).
        """
        if mask is not None and lengths is not None:
            raise ValueError("pass lengths or mask, not both")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, d_model]")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
            hidden = self.embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"inputs_embeds must be [batch, tokens, {self.config.d_model}], "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            hidden = inputs_embeds.to(self.dtype)
        if self.config.embedding_multiplier != 1.0:  # Granite: every input embedding, image ones included
            hidden = hidden * self.config.embedding_multiplier
        if state is not None:
            self._check_state(state, hidden.shape[0])
        valid = mask if lengths is None else self._valid(lengths, hidden.shape[:2], hidden.device)
        dtype = self.dtype
        length = hidden.shape[1]
        if state is None and valid is None and self._pads(length):
            # positions after the last ones: causal layers never let them reach the real positions
            hidden = nn.functional.pad(hidden, (0, 0, 0, -length % PAD_MULTIPLE))
        out, residual = hidden, None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        uses = {i: u for u, i in enumerate(self.config.shared_layers)}
        for i, layer in enumerate(self.layers):
            shared = None
            if i in uses:
                shared = (self.shared[uses[i] % len(self.shared)], uses[i], hidden.to(dtype))
            if recompute and state is None:
                out, residual = checkpoint(
                    layer, out, residual, None, dtype, valid, shared, use_reentrant=False
                )
            else:
                layer_state = None if state is None else state.layers[i]
                out, residual = layer(out, residual, layer_state, dtype, valid, shared)
        if state is not None:
            state.seqlen += hidden.shape[1]
        if hidden.shape[1] != length:
            out, residual, hidden = out[:, :length], residual[:, :length], hidden[:, :length]
        hidden = self.norm_f.add(out, residual, self.config.residual_in_fp32)[0].to(dtype)
        return hidden if return_hidden else self.lm_head(hidden)

    def _pads(self, length: int) -> bool:
        """Whether a forward of `length` positions from no state pads its rows (`PAD_MULTIPLE`): only to
        train a model of Mamba-1 layers, whose training kernels would pad each layer's input otherwise."""
        mixers, ffns = PADDABLE
        cfg = self.config
        return (
            length % PAD_MULTIPLE != 0
            and torch.is_grad_enabled()
            and "mamba1" in cfg.mixers
            and set(cfg.mixers) <= mixers
            and set(cfg.ffns) <= ffns
            and not cfg.shared_layers
        )

    @staticmethod
    def _valid(lengths: torch.Tensor, shape: torch.Size, device) -> torch.Tensor | None:
        """The [B, T] mask of real positions, or None when every row is real to its end (the layers then
        take their unpadded path: no masked copy of Δ, the Δ bias and softplus inside the scan)."""
        lengths = torch.as_tensor(lengths, device=device)
        batch, T = shape
        low, high = torch.stack((lengths.min(), lengths.max())).tolist() if lengths.numel() else (0, 0)
        if lengths.shape != (batch,) or low < 0 or high > T:
            raise ValueError(f"lengths must be [{batch}] integers in [0, {T}], got {lengths.tolist()}")
        if low == T:
            return None
        return torch.arange(T, device=device)[None, :] < lengths[:, None]

    def _check_state(self, state: LMState, batch: int) -> None:
        if len(state.layers) != len(self.layers):
            raise ValueError(
                f"state has {len(state.layers)} layers, the model {len(self.layers)}: "
                "make it with this model's new_state()"
            )
        if state.batch_size != batch:
            raise ValueError(
                f"state holds {state.batch_size} sequences but the input has {batch}: "
                "make it with new_state(batch_size) or select() its rows"
            )
