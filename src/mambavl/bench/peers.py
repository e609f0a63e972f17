"""The peers that `mambavl bench` measures beside our language model.

- ``hf-mamba``: transformers' ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``Mamba2ForCausalLM`` with
  the LM's own config (its PyTorch path, unless the optional kernel packages are installed: the notes say
  which implementation transformers picked for each kernel).
- ``gpt-neox``: a transformer of the same size, transformers' ``GPTNeoXForCausalLM`` with Pythia-2.8B's
  shapes, SDPA attention and a KV cache; its prefill memory grows with the prompt, which is the point.
- ``mamba-ssm``: the reference implementation, ``mamba_ssm``'s ``MambaLMHeadModel`` with its Triton kernels
  and CUDA-graph decoding.

Every peer has random weights, built from a config directly on the target device and in the target dtype
(nothing is downloaded). A peer never raises: one that cannot run at all comes back with ``error`` set, and
each measurement that fails (out of memory, say) or is skipped is a line in ``notes``. Each peer frees its
model before returning.

What is measured, the same way for every peer:

- ``decode_tok_s[b]``: steady-state decoding at batch ``b``, in generated tokens per second over all rows,
  the prompt's prefill excluded. Through transformers' ``generate`` (greedy, KV / state cache, a random
  ``prompt_len``-token prompt) it is ``b * (n - 1) / (t(n) - t(1))``, where ``t(k)`` is the median wall time
  of a ``generate`` of exactly ``k`` new tokens: the difference removes the prefill, the first token and
  ``generate``'s set-up, leaving ``n - 1`` decoding steps. For mamba_ssm it is ``b * n / t``, ``t`` the
  time of ``n`` replays of its captured one-token decoding graph, each followed by the greedy choice of the
  next token, which is fed back.
- ``prefill_s[L]``: median seconds of one batch-1 forward over an ``L``-token prompt that fills the cache
  and computes the logits of the last position only (those of the first generated token).
- ``peak_mem_gib[L]``: ``torch.cuda.max_memory_allocated`` over that prefill, weights included, in GiB
  (CUDA only; empty on the CPU).

Timings synchronise CUDA around each call; a call is repeated ``repeat`` times after a warm-up, unless it is
slow enough that a single run says enough. A measurement whose single call would take longer than
``max_measure_s`` (extrapolated from the previous, smaller one: in proportion for prompt lengths, as equal
for batch sizes) is skipped with a note.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mambavl.bench.timing import sync as _sync
from mambavl.bench.timing import timed as _timed
from mambavl.lm.config import LMConfig
from mambavl.lm.layouts import HF_LAYOUTS

PEERS = ("hf-mamba", "gpt-neox", "mamba-ssm")
PROMPT_LEN = 16  # the prompt before decoding
MAX_MEASURE_S = 20.0  # longest single call a measurement may take
HF_MAMBA_MAX_PREFILL = 4096  # transformers' PyTorch Mamba-1 scan is a Python loop over positions
HF_MAMBA_MAX_DECODE_TOKENS = 32
GIB = 2**30

# Pythia-2.8B (EleutherAI/pythia-2.8b's config.json): the transformer of Mamba-2.8B's size.
PYTHIA_2_8B = dict(
    vocab_size=50304,
    hidden_size=2560,
    num_hidden_layers=32,
    num_attention_heads=32,
    intermediate_size=10240,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)

# transformers' modeling modules that look for mamba_ssm / causal_conv1d when first imported.
_HF_MAMBA_MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
    "transformers.models.mamba2.modeling_mamba2",
)
_PLACEHOLDER_FLAG = "__mambavl_placeholder__"


@dataclass
class PeerResult:
    name: str  # e.g. "transformers MambaForCausalLM", "mamba_ssm 2.3.2 (Triton, CUDA graphs)"
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # batch -> generated tokens/s, all rows
    prefill_s: dict[int, float] = field(default_factory=dict)  # prompt length -> seconds, batch 1
    peak_mem_gib: dict[int, float] = field(default_factory=dict)  # prompt length -> peak GiB in prefill
    notes: list[str] = field(default_factory=list)  # how it ran, and what was skipped and why
    error: str | None = None  # set when the peer could not run at all


# ---------------------------------------------------------------------------------------------- timing


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _measure(fn: Callable[[], object], repeat: int, budget_s: float) -> float:
    """`_timed` on an already compiled path, its first call timed too: a call too slow to repeat within
    `budget_s` is measured once."""
    first = _timed(fn, 1, warmup=False)
    if repeat <= 1 or first * repeat > budget_s:
        return first
    return _timed(fn, repeat, warmup=False)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def _sweep(
    keys: Iterable[int],
    measure: Callable[[int], tuple[float, float]],
    *,
    what: str,
    budget_s: float,
    notes: list[str],
    linear: bool = True,
) -> dict[int, float]:
    """{key: value} of `measure(key) -> (value, seconds of one call)` over the keys in increasing order.

    A key whose call would exceed `budget_s` is skipped: its time is extrapolated from the last measured
    key, in proportion to the key if `linear` (prompt lengths), else as equal (decoding, whose step time
    hardly grows with the batch until the batch is large). A failure is a note, and after running out of
    memory the larger keys are skipped."""
    keys = sorted(set(int(k) for k in keys))
    out: dict[int, float] = {}
    last: tuple[int, float] | None = None
    for i, key in enumerate(keys):
        if last is not None:
            estimate = last[1] * key / last[0] if linear else last[1]
            if estimate > budget_s:
                notes.append(
                    f"{what} {key}: skipped, one call would take about {estimate:.0f} s "
                    f"(limit {budget_s:g} s)"
                )
                continue
        failure = None
        try:
            value, call_s = measure(key)
        except torch.cuda.OutOfMemoryError:
            failure = "out of GPU memory"
        except Exception as e:
            failure = _short(e)
        if failure is None:
            out[key] = value
            last = (key, call_s)
            continue
        _release()
        notes.append(f"{what} {key}: {failure}")
        if failure == "out of GPU memory" and keys[i + 1 :]:
            notes.append(f"{what} {keys[i + 1 :]}: skipped after running out of memory")
            break
    return out


# ------------------------------------------------------------------------------------------- helpers


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if str(dtype).removeprefix("torch.") not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[str(dtype).removeprefix("torch.")]


def _tokens(vocab_size: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def _weights_note(model: torch.nn.Module, device: torch.device) -> str:
    note = f"{_size(_params(model))} parameters"
    if device.type == "cuda":
        note += f", {torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated after building"
    return note


def _pure_mamba(lm: LMConfig, peer: str) -> str:
    """The LM's one mixer kind ('mamba1' or 'mamba2'); ValueError for hybrids (Jamba) and feed-forwards."""
    kinds = set(lm.mixers)
    if len(kinds) != 1 or kinds - {"mamba1", "mamba2"} or set(lm.ffns) != {"none"}:
        raise ValueError(
            f"the {peer} peer runs pure Mamba-1 / Mamba-2 LMs; {lm.family} has mixers {sorted(kinds)} "
            f"and feed-forwards {sorted(set(lm.ffns))}"
        )
    if lm.bcdt_norm == "weighted":
        raise ValueError(f"the {peer} peer has no weighted B/C/dt RMSNorm (Jamba's)")
    return kinds.pop()


def _expand(lm: LMConfig, peer: str) -> int:
    if lm.d_inner % lm.d_model:
        raise ValueError(f"{peer}: d_inner {lm.d_inner} is not a multiple of d_model {lm.d_model}")
    return lm.d_inner // lm.d_model


# -------------------------------------------------------------------------------------- transformers


# the hybrids whose LMConfig is read from a transformers config (`lm.layouts`): the peer is built from it
HF_HYBRIDS = tuple(sorted(set(HF_LAYOUTS) - {"mamba", "falcon_mamba", "mamba2"}))


def hf_mamba_config(lm: LMConfig):
    """The transformers config of an LMConfig (the inverse of `mambavl.lm.layouts`' `_hf_mamba` and
    `_hf_mamba2`; a hybrid read from a transformers config gets that config back), and notes on what it
    cannot express (which does not change the cost)."""
    if lm.extra.get("model_type") in HF_HYBRIDS:
        from transformers import AutoConfig

        raw = {k: v for k, v in lm.extra.items() if k != "model_type" and not k.startswith("_")}
        note = f"transformers' {lm.extra['model_type']} built from the config this LM was read from"
        return AutoConfig.for_model(lm.extra["model_type"], **raw), [note]
    kind = _pure_mamba(lm, "hf-mamba")
    expand = _expand(lm, "hf-mamba")
    notes = []
    common = dict(
        hidden_size=lm.d_model,
        num_hidden_layers=lm.n_layer,
        vocab_size=lm.vocab_size,
        state_size=lm.d_state,
        conv_kernel=lm.d_conv,
        expand=expand,
        use_conv_bias=lm.conv_bias,
        use_bias=lm.proj_bias,
        hidden_act="silu",
        layer_norm_epsilon=lm.norm_eps,
        residual_in_fp32=lm.residual_in_fp32,
        tie_word_embeddings=lm.tie_embeddings,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    if kind == "mamba1":
        if lm.bcdt_norm == "weightless":
            from transformers import FalconMambaConfig

            return FalconMambaConfig(**common, time_step_rank=lm.dt_rank, mixer_rms_eps=lm.bcdt_eps), notes
        from transformers import MambaConfig

        return MambaConfig(**common, time_step_rank=lm.dt_rank), notes
    from transformers import Mamba2Config

    if not lm.gated_norm or lm.norm_before_gate or lm.d_has_hdim:
        notes.append(
            "transformers' Mamba2 always has the gated RMSNorm after the gate and one D per head; "
            f"this LM has gated_norm={lm.gated_norm}, norm_before_gate={lm.norm_before_gate}, "
            f"d_has_hdim={lm.d_has_hdim} (same cost up to a few element-wise operations)"
        )
    config = Mamba2Config(
        **common,
        num_heads=lm.nheads,
        head_dim=lm.headdim,
        n_groups=lm.ngroups,
        chunk_size=lm.chunk_size,
        time_step_limit=tuple(lm.dt_limit),
    )
    return config, notes


def _hf_kernels(module) -> str:
    """Which implementation transformers resolved for each optional kernel of a modeling module."""
    found = []
    for name, fn in sorted(vars(module).items()) if module is not None else ():
        if not inspect.isfunction(fn):
            continue
        try:
            captured = inspect.getclosurevars(fn).nonlocals
        except Exception:
            continue
        impl, reference = captured.get("implementation"), captured.get("torch_function")
        if impl is None or reference is None:
            continue
        where = "PyTorch" if impl is reference else getattr(impl, "__module__", "?")
        found.append(f"{captured.get('func_name', name)}: {where}")
    return "; ".join(found) or "no optional kernels"


def _run_hf(
    result: PeerResult,
    config,
    *,
    model_kwargs: dict,
    decode_batches,
    decode_tokens: int,
    prefill_lengths,
    dtype,
    device,
    repeat: int,
    prompt_len: int,
    max_prefill: int | None,
    max_measure_s: float,
    name: Callable[[int], str] | None = None,
) -> PeerResult:
    model = None
    try:
        import transformers
        from transformers import AutoModelForCausalLM

        dtype, device = _as_dtype(dtype), torch.device(device)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
        model.eval()
        if name is not None:
            result.name = name(_params(model))
        attn = getattr(model.config, "_attn_implementation", None)
        result.notes.append(
            f"transformers {transformers.__version__}, torch {torch.__version__}, {str(dtype)[6:]}, "
            f"random weights; {_weights_note(model, device)}"
            + (f"; attention: {attn}" if "attn_implementation" in model_kwargs else "")
        )
        result.notes.append("kernels: " + _hf_kernels(sys.modules.get(type(model).__module__)))
        vocab = config.vocab_size
        n = max(2, decode_tokens)
        if n != decode_tokens:
            result.notes.append(f"decode: {n} new tokens (the measure needs at least 2)")
        result.notes.append(
            f"decode: greedy generate, {prompt_len}-token prompt, {n} new tokens; "
            "tok/s = batch * (n - 1) / (t(n) - t(1))"
        )

        def decode(batch: int) -> tuple[float, float]:
            ids = _tokens(vocab, batch, prompt_len, device)
            mask = torch.ones_like(ids)

            def generate(k: int):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=k,
                    min_new_tokens=k,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=0,
                )
                if out.shape[1] != prompt_len + k:
                    raise RuntimeError(f"generate made {out.shape[1] - prompt_len} tokens, not {k}")

            with torch.inference_mode():
                generate(2)  # warm-up: this batch's first prefill and steps
                t_n = _measure(lambda: generate(n), repeat, max_measure_s)
                t_1 = _measure(lambda: generate(1), repeat, max_measure_s)
            if t_n > t_1:
                return batch * (n - 1) / (t_n - t_1), t_n
            result.notes.append(f"decode batch {batch}: t(n) <= t(1), so tok/s = batch * n / t(n)")
            return batch * n / t_n, t_n

        _decode_sweep(result, decode, decode_batches, max_measure_s)

        def prefill(ids: torch.Tensor) -> None:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

        _prefill_sweep(result, prefill, vocab, prefill_lengths, max_prefill, device, repeat, max_measure_s)
    except Exception as e:
        result.error = _short(e)
    finally:
        model = None
        _release()
    return result


def _decode_sweep(result: PeerResult, decode, batches, budget_s: float) -> None:
    """A peer's decode tok/s at each batch size into `result` (a batch's step time barely grows with it,
    so a skipped batch is estimated as taking as long as the last measured one)."""
    result.decode_tok_s.update(
        _sweep(batches, decode, what="decode batch", budget_s=budget_s, notes=result.notes, linear=False)
    )


def _prefill_sweep(
    result: PeerResult,
    run: Callable[[torch.Tensor], object],
    vocab: int,
    lengths,
    max_prefill: int | None,
    device: torch.device,
    repeat: int,
    budget_s: float,
) -> None:
    lengths = sorted(set(int(x) for x in lengths))
    if max_prefill is not None and (over := [x for x in lengths if x > max_prefill]):
        result.notes.append(f"prefill {over}: skipped, above this peer's max_prefill {max_prefill}")
        lengths = [x for x in lengths if x <= max_prefill]
    cuda = device.type == "cuda"
    if lengths:  # warm-up (kernel compilation and autotuning; their keys do not depend on the length)
        failure = None
        try:
            with torch.inference_mode():
                run(_tokens(vocab, 1, min(lengths[0], 512), device))
            _sync()
        except Exception as e:
            failure = _short(e)
        if failure is not None:
            _release()
            result.notes.append(f"prefill {lengths}: not measured, the warm-up failed ({failure})")
            return

    def measure(length: int) -> tuple[float, float]:
        ids = _tokens(vocab, 1, length, device)
        if cuda:
            _sync()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            seconds = _measure(lambda: run(ids), repeat, budget_s)
        if cuda:
            result.peak_mem_gib[length] = torch.cuda.max_memory_allocated(device) / GIB
        return seconds, seconds

    result.prefill_s.update(
        _sweep(lengths, measure, what="prefill length", budget_s=budget_s, notes=result.notes)
    )


def hf_mamba(
    lm: LMConfig,
    *,
    decode_batches,
    decode_tokens: int,
    prefill_lengths,
    dtype,
    device,
    repeat: int = 3,
    prompt_len: int = PROMPT_LEN,
    max_prefill: int | None = HF_MAMBA_MAX_PREFILL,
    max_decode_tokens: int | None = HF_MAMBA_MAX_DECODE_TOKENS,
    max_measure_s: float = MAX_MEASURE_S,
) -> PeerResult:
    """transformers' Mamba-1 / FalconMamba / Mamba-2 causal LM with `lm`'s config and random weights (or,
    for a hybrid read from a transformers config, that model: `HF_HYBRIDS`).

    Its PyTorch Mamba-1 scan loops over positions in Python (about 20 tok/s decoding at batch 1 for
    2.8B on an H200, seconds per thousand prompt tokens), so prompts above `max_prefill` are skipped and
    decoding makes at most `max_decode_tokens` tokens."""
    result = PeerResult(name="transformers Mamba")
    try:
        config, notes = hf_mamba_config(lm)
    except Exception as e:
        result.error = _short(e)
        return result
    result.name = f"transformers {_hf_class(config)}"
    result.notes.extend(notes)
    if max_decode_tokens is not None and decode_tokens > max_decode_tokens:
        result.notes.append(f"decode: {max_decode_tokens} new tokens instead of {decode_tokens} (too slow)")
        decode_tokens = max_decode_tokens
    return _run_hf(
        result,
        config,
        model_kwargs={},
        decode_batches=decode_batches,
        decode_tokens=decode_tokens,
        prefill_lengths=prefill_lengths,
        dtype=dtype,
        device=device,
        repeat=repeat,
        prompt_len=prompt_len,
        max_prefill=max_prefill,
        max_measure_s=max_measure_s,
    )


def _hf_class(config) -> str:
    return {
        "mamba": "MambaForCausalLM",
        "falcon_mamba": "FalconMambaForCausalLM",
        "mamba2": "Mamba2ForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM",
    }.get(config.model_type, config.model_type)


def gpt_neox(
    *,
    decode_batches,
    decode_tokens: int,
    prefill_lengths,
    dtype,
    device,
    repeat: int = 3,
    prompt_len: int = PROMPT_LEN,
    max_prefill: int | None = None,
    max_measure_s: float = MAX_MEASURE_S,
    config_overrides: dict | None = None,
) -> PeerResult:
    """transformers' GPTNeoXForCausalLM with Pythia-2.8B's shapes (`config_overrides` replaces any of
    them, e.g. to shrink it for a test), SDPA attention, a KV cache and random weights."""
    result = PeerResult(name="transformers GPT-NeoX (SDPA)")
    try:
        from transformers import GPTNeoXConfig

        longest = max([int(x) for x in prefill_lengths] + [0]) + prompt_len + decode_tokens + 1
        kwargs = {**PYTHIA_2_8B, "max_position_embeddings": max(131072, longest), **(config_overrides or {})}
        config = GPTNeoXConfig(**kwargs)
    except Exception as e:
        result.error = _short(e)
        return result
    if config_overrides:
        result.notes.append(f"Pythia-2.8B's config with {sorted(config_overrides)} replaced")
    custom = ", custom config" if config_overrides else ""
    return _run_hf(
        result,
        config,
        model_kwargs={"attn_implementation": "sdpa"},
        decode_batches=decode_batches,
        decode_tokens=decode_tokens,
        prefill_lengths=prefill_lengths,
        dtype=dtype,
        device=device,
        repeat=repeat,
        prompt_len=prompt_len,
        max_prefill=max_prefill,
        max_measure_s=max_measure_s,
        name=lambda n: f"transformers GPT-NeoX {_size(n)} (SDPA{custom})",
    )


# ------------------------------------------------------------------------------------------- mamba_ssm


def _placeholder_extension() -> types.ModuleType:
    """Stands in for mamba_ssm's CUDA extension, which its package imports unconditionally although only
    `selective_scan_fn` / `mamba_inner_fn` (Mamba-1's prefill and training) call it."""
    module = types.ModuleType("selective_scan_cuda")

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            "mamba_ssm's CUDA extension selective_scan_cuda is not installed "
            "(selective_scan_fn / mamba_inner_fn, used by Mamba-1's prefill, need it)"
        )

    module.fwd = module.bwd = unavailable
    setattr(module, _PLACEHOLDER_FLAG, True)
    return module


def _import_mamba_ssm() -> tuple[types.ModuleType, bool]:
    """mamba_ssm and whether its CUDA extension is real; ImportError when it cannot be imported."""
    # transformers picks its optional kernels from mamba_ssm when its Mamba modules are first imported:
    # import them before mamba_ssm can import, so the hf-mamba peer keeps its own path whatever runs first.
    for name in _HF_MAMBA_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    placeholder = None
    if sys.modules.get("mamba_ssm") is None:
        try:
            importlib.import_module("selective_scan_cuda")
        except ImportError:
            placeholder = sys.modules["selective_scan_cuda"] = _placeholder_extension()
    try:
        package = importlib.import_module("mamba_ssm")
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        for name in ("mamba_ssm.models.mixer_seq_simple", "mamba_ssm.utils.generation"):
            importlib.import_module(name)
    except Exception as e:
        raise ImportError(f"mamba_ssm is not importable ({_short(e)})") from e
    finally:
        if placeholder is not None and sys.modules.get("selective_scan_cuda") is placeholder:
            del sys.modules["selective_scan_cuda"]
    real = not getattr(interface.selective_scan_cuda, _PLACEHOLDER_FLAG, False)
    return package, real


def mamba_ssm_config(lm: LMConfig) -> tuple[dict, list[str]]:
    """Keyword arguments of mamba_ssm's MambaConfig for an LMConfig (the inverse of `mambavl.lm.layouts`'
    `_mamba_ssm`), and notes on what it cannot express (which does not change the cost)."""
    kind = _pure_mamba(lm, "mamba-ssm")
    notes = []
    ssm = dict(
        d_state=lm.d_state,
        d_conv=lm.d_conv,
        expand=_expand(lm, "mamba-ssm"),
        conv_bias=lm.conv_bias,
        bias=lm.proj_bias,
    )
    if kind == "mamba1":
        ssm.update(layer="Mamba1", dt_rank=lm.dt_rank)
        if lm.bcdt_norm:
            notes.append("mamba_ssm has no B/C/dt RMSNorm (FalconMamba's): measured without it")
    else:
        ssm.update(
            layer="Mamba2",
            headdim=lm.headdim,
            ngroups=lm.ngroups,
            chunk_size=lm.chunk_size,
            dt_limit=tuple(lm.dt_limit),
            rmsnorm=lm.gated_norm,
            norm_before_gate=lm.norm_before_gate,
            D_has_hdim=lm.d_has_hdim,
        )
    config = dict(
        d_model=lm.d_model,
        n_layer=lm.n_layer,
        vocab_size=lm.vocab_size,
        ssm_cfg=ssm,
        rms_norm=True,
        residual_in_fp32=lm.residual_in_fp32,
        fused_add_norm=True,  # its Triton RMSNorm with the residual add fused: no CUDA extension needed
        pad_vocab_size_multiple=1,  # the LMConfig's vocabulary is padded already
        tie_embeddings=lm.tie_embeddings,
    )
    return config, notes


def mamba_ssm(
    lm: LMConfig,
    *,
    decode_batches,
    decode_tokens: int,
    prefill_lengths,
    dtype,
    device,
    repeat: int = 3,
    prompt_len: int = PROMPT_LEN,
    max_prefill: int | None = None,
    max_measure_s: float = MAX_MEASURE_S,
) -> PeerResult:
    """mamba_ssm's MambaLMHeadModel with `lm`'s config and random weights (CUDA only).

    Decoding replays the one-token graph that `mamba_ssm.utils.generation.update_graph_cache` captures
    (the machinery of its `generate(..., cg=True)`), from zero states: a step costs the same whatever the
    state holds, and this needs no prefill, which Mamba-1 cannot do without mamba_ssm's CUDA extension.
    Prefill is its forward with an InferenceParams cache, measured where it runs: Mamba-2 always (Triton
    SSD), Mamba-1 only with the CUDA extension `selective_scan_cuda` installed."""
    result = PeerResult(name="mamba_ssm")
    model = None
    try:
        module, real_extension = _import_mamba_ssm()
    except ImportError as e:
        result.error = str(e)
        return result
    result.name = f"mamba_ssm {module.__version__} (Triton, CUDA graphs)"
    try:
        dtype, device = _as_dtype(dtype), torch.device(device)
        if device.type != "cuda":
            result.error = f"mamba_ssm needs a CUDA device (Triton kernels, CUDA graphs), not {device}"
            return result
        config_kwargs, notes = mamba_ssm_config(lm)
        result.notes.extend(notes)
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.utils.generation import InferenceParams, update_graph_cache

        kind = config_kwargs["ssm_cfg"]["layer"]
        with torch.device(device):
            model = MambaLMHeadModel(MambaConfig(**config_kwargs), device=device, dtype=dtype)
        model.eval()
        conv = "causal_conv1d" in sys.modules and sys.modules["causal_conv1d"] is not None
        triton = importlib.import_module("triton")
        result.notes.append(
            f"mamba_ssm {module.__version__}, triton {triton.__version__}, torch {torch.__version__}, "
            f"{str(dtype)[6:]}, {kind}, fused_add_norm (Triton RMSNorm), random weights; "
            f"{_weights_note(model, device)}"
        )
        result.notes.append(
            "selective_scan_cuda (CUDA extension): "
            + ("installed" if real_extension else "not installed (a placeholder let mamba_ssm import)")
            + "; causal_conv1d: "
            + ("installed" if conv else "not installed (convolutions in PyTorch)")
        )
        n = max(1, decode_tokens)
        result.notes.append(
            f"decode: update_graph_cache + CUDA graph replay, selective_state_update (Triton), {n} steps "
            "from zero states, greedy argmax fed back; tok/s = batch * n / t"
        )

        def decode(batch: int) -> tuple[float, float]:
            cache = update_graph_cache(model, None, batch, prompt_len, prompt_len + n + 1)
            try:
                with torch.inference_mode():
                    first = _tokens(lm.vocab_size, batch, 1, device)
                    position = torch.zeros_like(first)

                    def steps() -> None:
                        token = first
                        for i in range(n):
                            logits = cache.run(token, position, prompt_len + i)
                            token = logits[:, -1:].argmax(dim=-1)

                    seconds = _measure(steps, repeat, max_measure_s)
            finally:
                cache = None
                _release()
            return batch * n / seconds, seconds

        _decode_sweep(result, decode, decode_batches, max_measure_s)

        if kind == "Mamba1" and not real_extension:
            if prefill_lengths:
                result.notes.append(
                    "prefill: not measured; Mamba-1's forward over a prompt needs selective_scan_fn, "
                    "i.e. mamba_ssm's CUDA extension selective_scan_cuda, which is not installed"
                )
        else:
            result.notes.append(
                "prefill: forward with InferenceParams (fills the cache), last position's logits; "
                + ("chunked SSD scan (Triton)" if kind == "Mamba2" else "selective_scan_fn (CUDA extension)")
            )

            def prefill(ids: torch.Tensor) -> None:
                params = InferenceParams(max_seqlen=ids.shape[1] + 1, max_batch_size=ids.shape[0])
                model(ids, inference_params=params, num_last_tokens=1)

            _prefill_sweep(
                result, prefill, lm.vocab_size, prefill_lengths, max_prefill, device, repeat, max_measure_s
            )
    except Exception as e:
        result.error = _short(e)
    finally:
        model = None
        _release()
    return result


# --------------------------------------------------------------------------------------------- running

_RUNNERS: dict[str, Callable[..., PeerResult]] = {
    "hf-mamba": hf_mamba,
    "gpt-neox": gpt_neox,
    "mamba-ssm": mamba_ssm,
}


def run_peers(lm: LMConfig, which: list[str], **kw) -> list[PeerResult]:
    """Run the named peers (a subset of PEERS, in the order given) one after the other.

    Keywords go to every peer that takes them (decode_batches, decode_tokens, prefill_lengths, dtype and
    device to all; config_overrides to gpt-neox alone, ...). Unknown peer names or keywords no peer takes
    raise ValueError / TypeError before anything runs; the peers themselves never raise."""
    if unknown := [name for name in which if name not in _RUNNERS]:
        raise ValueError(f"unknown peer(s) {unknown}; known: {list(PEERS)}")
    accepted = {name: set(inspect.signature(_RUNNERS[name]).parameters) for name in which}
    known = set().union(*(inspect.signature(fn).parameters for fn in _RUNNERS.values()))
    if stray := sorted(set(kw) - known - {"lm"}):
        raise TypeError(f"no peer takes the keyword(s) {stray}")
    results = []
    for name in which:
        fn = _RUNNERS[name]
        args = {k: v for k, v in kw.items() if k in accepted[name]}
        try:
            results.append(fn(lm, **args) if "lm" in accepted[name] else fn(**args))
        except Exception as e:  # a peer should not raise; if one does, it is still one result
            results.append(PeerResult(name=name, error=_short(e)))
        _release()
    return results
