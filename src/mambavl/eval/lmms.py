"""lmms-eval adapter: `lmms-eval --model mambavl --model_args pretrained=DIR --tasks ...` runs any model
`mambavl.load` reads (our layout, a Cobra / ML-Mamba run directory, a Viper checkpoint, a preset).

How lmms-eval finds it: lmms-eval (≥ 0.7) resolves `--model NAME` through its model registry
(`lmms_eval.models.MODEL_REGISTRY_V2`), filled from its built-in table and from the Python entry-point
group `lmms_eval.models`. mambavl's pyproject.toml declares `mambavl = "mambavl.eval.lmms:manifest"` in
that group, so installing mambavl is all it takes: the CLI and `lmms_eval.evaluator.simple_evaluate(
model="mambavl", ...)` import this module by themselves. (`lmms_eval.api.registry.register_model` fills
a dict that lmms-eval 0.7's evaluator no longer reads, and the `LMMS_EVAL_PLUGINS` variable is
deprecated, so neither is used here. `lmms-eval models` lists only lmms-eval's built-in table, so mambavl
is not shown there, yet `--model mambavl` resolves.)

Requests: one image per request (the first, with a warning, when a document has several; None for
text-only documents), the task's context wrapped by the model's own prompt builder. `generate_until` is
batched through `VLM.generate`; `loglikelihood` scores the continuation in one forward pass over
prompt + continuation and returns, as lmms-eval's models do, a loss: the continuation's negative
log-probability, summed over its tokens (its `multiple_choice` scorer picks the option with the smallest).
This module is the only one that imports lmms_eval, so mambavl works without it.
One process: the whole evaluation runs on one device (no data-parallel ranks). lmms-eval 0.7's response
cache (`--use_cache`) cannot hold loglikelihood results (it expects text), so leave it off for
multiple_choice tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from mambavl.vlm.sequence import IMAGE_PLACEHOLDER, split_at_placeholder

# lmms-eval's own models default to 1024 new tokens when a task does not say
DEFAULT_MAX_NEW_TOKENS = 1024
# lmms-eval 0.7 passes every model output through `unwrap_generation_output`, which keeps strings and
# `GenerationResult.text` as they are but turns a loglikelihood's (float, bool) into its repr, so that its
# multiple_choice scorer fails on it; a GenerationResult carries the pair through unchanged.
WRAP_SCORES = isinstance(unwrap_generation_output((0.0, True))[0], str)


def manifest():
    """The `lmms_eval.models` entry point: where lmms-eval finds the model class named `mambavl`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mambavl", simple_class_path=f"{__name__}.MambaVL")


def sampling_kwargs(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's gen_kwargs -> `VLM.generate` keyword arguments, and the keys it cannot honour.
    temperature 0 (or do_sample false) is greedy; do_sample without a temperature samples at 1.0."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    out = {
        "max_new_tokens": int(kw.pop("max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS),
        "stop": tuple(s for s in until if s),
    }
    if int(kw.pop("num_beams", None) or 1) != 1:
        raise ValueError(
            f"gen_kwargs {gen_kwargs}: mambavl decodes greedily or by sampling, not by beam search; "
            "set num_beams=1 (e.g. --gen_kwargs num_beams=1)"
        )
    temperature, do_sample = kw.pop("temperature", None), kw.pop("do_sample", None)
    top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
    if do_sample is None:
        do_sample = temperature is not None and float(temperature) > 0
    temperature = 1.0 if temperature is None else float(temperature)
    if do_sample and temperature > 0:
        out.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            out["top_p"] = float(top_p)
        if top_k:
            out["top_k"] = int(top_k)
    if (penalty := kw.pop("repetition_penalty", None)) is not None:
        out["repetition_penalty"] = float(penalty)
    return out, sorted(kw)  # what is left is meant for other models (e.g. image_aspect_ratio)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MambaVL(lmms):
    """`--model_args pretrained=DIR_OR_PRESET[,device=auto|cpu|cuda:N][,dtype=auto|bfloat16|float16|float32]
    [,batch_size=N]`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it for batch_size=auto, which we refuse
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"mambavl model_args {sorted(unknown)} are unknown; "
                "it takes pretrained, device, dtype and batch_size"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: mambavl takes a whole number ≥ 1 (not 'auto')")
        from mambavl.runtime import load_model

        self.vlm = load_model(str(pretrained), device=device or "auto", dtype=dtype)
        self.batch_size = int(batch_size)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ---- requests -> (image, prompt) -------------------------------------------------------------------
    def prompt(self, context: str, has_image: bool) -> str:
        """The context as the model's user turn; models that take the image at `<image>` get it first."""
        if (
            has_image
            and self.vlm.config.image_placement == "placeholder"
            and IMAGE_PLACEHOLDER not in context
        ):
            context = f"{IMAGE_PLACEHOLDER}\n{context}"
        builder = self.vlm.get_prompt_builder()
        builder.add_turn("human", context)
        return builder.get_prompt()

    def image(self, doc_to_visual, task: str, split: str, doc_id) -> object | None:
        """The document's first visual, or None."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        if isinstance(visuals, Sequence) and not isinstance(visuals, str | bytes):
            visuals = [v for v in visuals if v is not None]
            if len(visuals) > 1:
                self._warn_once(
                    f"visuals:{task}",
                    f"{task}: documents have {len(visuals)} visuals; mambavl models take one image, "
                    "so only the first is used",
                )
            return visuals[0] if visuals else None
        return visuals

    # ---- lmms API ----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        # one batch per distinct gen_kwargs (greedy and sampled requests never share a batch)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mambavl generate")
        for indices in groups.values():
            kwargs, unused = sampling_kwargs(requests[indices[0]].args[1])
            if unused:
                self._warn_once(
                    f"gen:{unused}", f"gen_kwargs {unused} do not apply to mambavl and are ignored"
                )
            for chunk in _batches(indices, self.batch_size):
                images, prompts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    image = self.image(doc_to_visual, task, split, doc_id)
                    images.append(image)
                    prompts.append(self.prompt(context, image is not None))
                texts = self.vlm.generate(images, prompts, **kwargs)
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list:
        out = []
        for chunk in tqdm(
            list(_batches(requests, self.batch_size)), disable=self.rank != 0, desc="mambavl loglikelihood"
        ):
            images, prompts, continuations = [], [], []
            for request in chunk:
                if len(request.args) == 2:  # multiple_choice's acc_mutual_info: no document, no image
                    (context, continuation), image = request.args, None
                else:
                    context, target, doc_to_visual, doc_id, task, split = request.args
                    image = self.image(doc_to_visual, task, split, doc_id)
                    continuation = (
                        target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                    )
                images.append(image)
                prompts.append(self.prompt(context, image is not None))
                continuations.append(str(continuation))
            for request, (logprob, greedy) in zip(
                chunk, continuation_logprobs(self.vlm, images, prompts, continuations), strict=True
            ):
                # lmms-eval's sign: its multiple_choice scorer takes the argmin, as its own models return
                # a loss; the negated sum keeps acc (and acc_norm's per-character division) lm-eval's
                score = (-logprob, greedy)
                self.cache_hook.add_partial("loglikelihood", request.args[:2], score)
                out.append(GenerationResult(score) if WRAP_SCORES else score)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "mambavl does not run generate_until_multi_round tasks (multi-round dialogue benchmarks); "
            "choose generate_until, loglikelihood or multiple_choice tasks"
        )


def continuation_length(vlm, prompt: str, continuation: str, has_image: bool) -> int:
    """How many tokens `continuation` adds after `prompt`, tokenized together as `VLM.prepare` tokenizes
    them (lm-eval's convention: encode(prompt + continuation) minus encode(prompt); placeholder models
    tokenize the text after `<image>` on its own)."""
    tail = prompt
    if has_image and vlm.config.image_placement == "placeholder":
        tail = split_at_placeholder(prompt)[1]
    return len(vlm.tokenizer.encode(tail + continuation)) - len(vlm.tokenizer.encode(tail))


@torch.inference_mode()
def continuation_logprobs(
    vlm, images: list, prompts: list[str], continuations: list[str]
) -> list[tuple[float, bool]]:
    """For each row, log P(continuation | image, prompt) summed over its tokens, and whether greedy decoding
    would produce exactly those tokens. One causal forward pass over the right-padded rows."""
    batch, ids = vlm.prepare(images, [p + c for p, c in zip(prompts, continuations, strict=True)])
    hidden = vlm.lm(inputs_embeds=batch.embeds.to(vlm.device), return_hidden=True)
    out = []
    for b, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        n = continuation_length(vlm, prompt, continuation, images[b] is not None)
        if n <= 0:  # nothing to score
            out.append((0.0, True))
            continue
        end = int(batch.lengths[b])
        targets = torch.tensor(ids[b][-n:], device=hidden.device)
        logits = vlm.lm.lm_head(hidden[b, end - n - 1 : end - 1]).float()
        logits[:, vlm.tokenizer.vocab_size :] = float("-inf")  # the LM's padded rows, as generation does
        logprobs = logits.log_softmax(-1).gather(1, targets[:, None])
        out.append((float(logprobs.sum()), bool((logits.argmax(-1) == targets).all())))
    return out
