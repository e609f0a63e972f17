"""The VLM: image → vision tower → projector → spliced into the LM's embeddings (image first, as in
Cobra and ML-Mamba) → LM → next token. Generation runs on the LM's recurrent state: the prompt is
prefilled once, each new token is one O(1) step, and ragged batches are exact (see `vlm.sequence`)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from mambavl.lm import LanguageModel
from mambavl.presets import PRESETS, RELEASES
from mambavl.projectors import create_projector
from mambavl.runtime import to_device
from mambavl.vision import create_tower, load_image
from mambavl.vision.anyres import anyres_views, merge_anyres
from mambavl.vlm.backbones import LLMBackbone, VisionBackbone
from mambavl.vlm.config import VLMConfig
from mambavl.vlm.graphs import (
    GraphCaptureError,
    GraphDecoder,
    KVGraphDecoder,
    graph_decoder,
    graph_support,
)
from mambavl.vlm.prefill_graphs import PREFILL_POSITIONS, PrefillGraphs, prefill_graph_support
from mambavl.vlm.prompts import ChatTemplateBuilder, PromptBuilder
from mambavl.vlm.sampling import SamplingParams
from mambavl.vlm.sequence import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    MultimodalBatch,
    pack,
    splice_image_first,
    split_at_placeholder,
    wrap_image_marker,
)
from mambavl.vlm.tokenizer import TextTokenizer, hub_chat_template, load_tokenizer
from mambavl.vlm.tower_graphs import TowerGraphs
from mambavl.vlm.tower_graphs import batch_of as _batch_of


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the tower: its transformed view(s) on the CPU (one, or AnyRes's base view and
    tiles), its original size and AnyRes grid."""

    views: list  # each a tensor [3, H, W], or a dict of them for fused towers
    size: tuple[int, int]
    grid: tuple[int, int] | None = None

    @cached_property
    def digest(self) -> str:
        """A digest of what the tower sees (every view's pixels, shape and dtype), the original size and the
        AnyRes grid: two images share prefix-cache snapshots only when the model would see the same input.
        `VLM.preprocess` computes it, so that a server hashes in its worker threads, not on the engine's."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((tuple(self.size), self.grid)).encode())
        for view in self.views:
            parts = sorted(view.items()) if isinstance(view, dict) else [("", view)]
            for name, t in parts:
                t = t.detach().to("cpu").contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


@dataclass(frozen=True)
class PromptIds:
    """A tokenized prompt: its ids before the image and after it. `after` is empty unless the image goes
    at the prompt's `<image>` (LLaVA-style); where the image goes first, or there is none, `before` is all."""

    before: list[int]
    after: list[int] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.before + self.after


@dataclass
class LossSum:
    loss: torch.Tensor  # summed over the learned tokens
    tokens: int  # how many tokens were learned


class VLM(nn.Module):
    # Prompts are prefilled in chunks of about this many positions over all rows (each row an equal share,
    # at least 512 positions): activation memory stays flat in the prompt's length (the recurrent state
    # carries everything between chunks), and a long prompt of one row goes in a few large calls rather
    # than many small ones, whose launches would leave the GPU waiting. None: all at once.
    prefill_chunk: int | None = 16384

    def __init__(
        self, config: VLMConfig, tokenizer: TextTokenizer | None = None, pretrained_tower: bool = False
    ):
        super().__init__()
        self.config = config
        self.vision = build_tower(config.tower, pretrained_tower, config.feature_layer, config.tower_options)
        self.projector = create_projector(
            config.projector, self.vision.embed_dim, config.lm.d_model, **config.projector_options
        )
        self.lm = LanguageModel(config.lm)
        self.image_newline = nn.Parameter(torch.zeros(config.lm.d_model)) if config.image_newline else None
        self.image_transform = self.vision.transform(config.resize)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:  # loaded on first use: building a model needs no tokenizer
            self._tokenizer = load_tokenizer(self.config.tokenizer, self.config.eos_token)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- the seeds' attribute names: scripts written for Cobra / ML-Mamba read these (`mambavl.compat`) ----
    @property
    def model_id(self) -> str:
        return self.config.name

    @property
    def arch_specifier(self) -> str:
        """The released run config's ("no-align+fused-gelu-mlp") for the seeds' released models; the
        projector's name for every other model."""
        release = RELEASES.get(self.config.name)
        return release.arch_specifier if release else self.config.projector

    @property
    def half_precision_dtype(self) -> torch.dtype:
        """The dtype the seeds run in: `vlm.to(dtype=vlm.half_precision_dtype)`."""
        return torch.bfloat16

    @property
    def vision_backbone(self):
        """The vision tower as the seeds' `VisionBackbone` shows it (`identifier`, `image_transform`, ...)."""
        return VisionBackbone(self)

    @property
    def llm_backbone(self):
        """The LM as the seeds' `LLMBackbone` shows it (`identifier`, `llm`, `tokenizer`, ...)."""
        return LLMBackbone(self)

    # (the checkpoint readers build VLMs: imported where they run)
    def save_pretrained(self, directory):
        """mambavl's own layout: config.json, model.safetensors (all weights), tokenizer.json."""
        from mambavl.checkpoints.vlm import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None) -> VLM:
        """Same as `mambavl.load`: our layout, the seeds' layouts, or a preset's released weights."""
        from mambavl.checkpoints.vlm import load

        return load(name_or_path, dtype=dtype, device=device)

    def get_prompt_builder(self, system_prompt: str | None = None) -> PromptBuilder | ChatTemplateBuilder:
        if self.config.prompt_format == "chat-template":
            template = self.config.chat_template or hub_chat_template(self.config.tokenizer)
            return ChatTemplateBuilder(
                template, self.config.system_prompt if system_prompt is None else system_prompt
            )
        return PromptBuilder(
            self.config.prompt_format, system_prompt, keep_image=self.config.image_placement == "placeholder"
        )

    # ---- inputs --------------------------------------------------------------------------------------------
    def _stack(self, tensors: list) -> torch.Tensor | dict[str, torch.Tensor]:
        if isinstance(tensors[0], dict):
            return {k: self._stack([t[k] for t in tensors]) for k in tensors[0]}
        if all(t.is_pinned() and t.dtype == self.vision_dtype for t in tensors):  # `preprocess`'s views
            # queued copies, one a view, stacked on the device: the engine's thread does not wait for them
            return torch.stack([t.to(self.device, non_blocking=True) for t in tensors])
        return torch.stack(tensors).to(device=self.device, dtype=self.vision_dtype)

    def pixel_values(self, images: list) -> torch.Tensor | dict[str, torch.Tensor]:
        """Images (PIL, paths or bytes) -> the tower's batched input, on the model's device and dtype."""
        return self._stack([self.image_transform(load_image(im, self.config.max_pixels)) for im in images])

    @property
    def images_vary(self) -> bool:
        """Whether images take different numbers of positions (AnyRes tiles, or a tower that reads each
        image at its own size): the data pipeline then hands images on whole, not as stacked pixels."""
        return self.config.anyres is not None or getattr(self.vision, "dynamic", False)

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def encode_images(self, pixel_values, graphs: bool = True) -> torch.Tensor:
        """[B, P, d_model]: the projected image embeddings of single-view images. Under inference mode on a
        GPU, batches of up to 16 images replay CUDA graphs where `graphs` is on (`vlm.tower_graphs`)."""
        towers = self.tower_graphs() if graphs and torch.is_inference_mode_enabled() else None
        if towers is not None and towers.bucket(_batch_of(pixel_values)) is not None:
            try:
                return towers(pixel_values)
            except GraphCaptureError as e:  # nothing was written: the towers run eagerly from now on
                self._graphs_failed("_tower_graphs", "the vision towers run eagerly", e)
        return self._encode(pixel_values)

    def _encode(self, pixel_values) -> torch.Tensor:
        return self.projector(self.vision(pixel_values)).to(self.dtype)

    def tower_graphs(self) -> TowerGraphs | None:
        """The CUDA graphs of the towers and projector over small batches (kept between calls, each captured
        when a batch first needs it), or None where they do not apply (CPU, a tower that reads each image
        at its own size, a capture that failed)."""
        current = getattr(self, "_tower_graphs", None)
        if current is False or self.device.type != "cuda" or getattr(self.vision, "dynamic", False):
            return None
        first = [next(module.parameters(), None) for module in (self.vision, self.projector)]
        key = (self.device, *((p.dtype, p.data_ptr()) for p in first if p is not None))
        if current is None or current.key != key:
            self._tower_graphs = None  # free the old graphs' memory before capturing new ones
            current = self._tower_graphs = TowerGraphs(self._encode, key)
        return current

    def preprocess(self, image) -> PreparedImage:
        """The CPU part of reading an image (decoding, AnyRes tiling, resizing, normalising), done apart
        from the GPU work: a server runs it in worker threads while the engine decodes."""
        if isinstance(image, PreparedImage):
            return image
        img = load_image(image, self.config.max_pixels)
        if self.config.anyres is None:
            prepared = PreparedImage([self._view(img)], img.size)
        else:
            views, grid = anyres_views(img, list(self.config.anyres), self.vision.image_size)
            prepared = PreparedImage([self._view(v) for v in views], img.size, grid)
        prepared.digest  # noqa: B018 (computed here, in the caller's thread)
        return prepared

    def _view(self, image) -> torch.Tensor | dict[str, torch.Tensor]:
        """One transformed view, in the tower's dtype (the cast the tower's input takes anyway) and, for a
        model on a GPU, in pinned memory: the engine's thread then only queues its copy."""
        view = self.image_transform(image)
        pin = self.device.type == "cuda"

        def ready(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.vision_dtype)
            return t.pin_memory() if pin else t

        return {k: ready(t) for k, t in view.items()} if isinstance(view, dict) else ready(view)

    @cached_property
    def positions_per_view(self) -> int:
        """Positions one view of an image takes after the projector (e.g. 729 patches, or 196 after
        LDPv2's pooling), from a dry run of the projector (once)."""
        projector_dtype = next(self.projector.parameters()).dtype
        features = torch.zeros(1, self.vision.num_patches, self.vision.embed_dim, device=self.device)
        with torch.no_grad():
            return self.projector(features.to(projector_dtype)).shape[1]

    def image_positions(self, image: PreparedImage) -> int:
        """Positions `image` takes in the LM's input, without running the tower: what a server checks a
        request's length with before queuing it."""
        per_view = self.positions_per_view
        if self.config.anyres is None:
            if getattr(self.vision, "dynamic", False):  # token-wise from the tower on: scale by its count
                height, width = image.views[0].shape[-2:]
                return self.vision.positions_for(height, width) * per_view // self.vision.num_patches
            return per_view
        if self.image_newline is None:
            return per_view * len(image.views)
        shape_only = torch.zeros(len(image.views), per_view, 1)  # one channel: merge_anyres only unpads
        return merge_anyres(shape_only, image.grid, image.size, torch.zeros(1)).shape[0]

    def encode_prompt(
        self, prompt: str, has_image: bool, name: str = "the prompt", release_gil: bool = False
    ) -> PromptIds:
        """A prompt's ids, split where its image goes. `release_gil` lets other threads run meanwhile
        (a server tokenizes in worker threads beside its engine thread)."""
        encode = self.tokenizer.encode_releasing_gil if release_gil else self.tokenizer.encode
        if self.config.image_placement == "placeholder":
            if has_image:
                before, after = split_at_placeholder(prompt)
                before, after = wrap_image_marker(before, after, self.config.image_wrap)
                return PromptIds(encode(before), encode(after))
            if IMAGE_PLACEHOLDER in prompt:
                raise ValueError(f"{name} has '{IMAGE_PLACEHOLDER}' but no image was given for it")
        ids = encode(prompt)
        if not ids and not has_image:
            raise ValueError(f"{name} is empty and has no image: there is nothing to continue from")
        return PromptIds(ids)

    def image_embeddings(self, images: list, graphs: bool = True) -> list[torch.Tensor]:
        """Each image's embedding sequence [N_i, d_model]; with AnyRes, N_i depends on the image's shape.
        Images: anything `load_image` reads, or `preprocess`'s output. `graphs`: as `encode_images`."""
        prepared = [self.preprocess(im) for im in images]
        if self.config.anyres is None:  # one view an image; views of one size go through the tower together
            views = [p.views[0] for p in prepared]
            sizes: dict[tuple, list[int]] = {}
            for i, view in enumerate(views):
                sizes.setdefault(_shape(view), []).append(i)
            out: list = [None] * len(views)
            for rows in sizes.values():
                for i, emb in zip(
                    rows, self.encode_images(self._stack([views[i] for i in rows]), graphs), strict=True
                ):
                    out[i] = emb
            return out
        out = []
        for p in prepared:
            features = self.encode_images(self._stack(p.views), graphs)
            if self.image_newline is not None:
                out.append(merge_anyres(features, p.grid, p.size, self.image_newline.to(features.dtype)))
            else:
                out.append(features.flatten(0, 1))
        return out

    def prepare(
        self, images: list, prompts: list[str | PromptIds]
    ) -> tuple[MultimodalBatch, list[list[int]]]:
        """Rows of (image or None, prompt) -> a packed batch, and each row's prompt ids. The image goes
        first (Cobra, ML-Mamba) or where the prompt says `<image>` (Viper, LLaVA-style). A prompt may
        come tokenized already (`encode_prompt`)."""
        with_image = [b for b, im in enumerate(images) if im is not None]
        encoded = dict(
            zip(
                with_image,
                self.image_embeddings([images[b] for b in with_image]) if with_image else [],
                strict=True,
            )
        )

        def embed(ids: list[int]) -> torch.Tensor:
            return self.lm.embed(torch.tensor([ids], dtype=torch.long, device=self.device))[0]

        rows, all_ids = [], []
        for b, prompt in enumerate(prompts):
            image = encoded.get(b)
            tokens = (
                prompt
                if isinstance(prompt, PromptIds)
                else self.encode_prompt(prompt, image is not None, name=f"prompt {b}")
            )
            if self.config.image_placement == "placeholder" and image is not None:
                row = torch.cat([embed(tokens.before), image, embed(tokens.after)])
            else:
                row = splice_image_first(embed(tokens.before), image)[0]
            rows.append(row)
            all_ids.append(tokens.ids)
        batch = pack(rows, [None] * len(rows))
        longest = int(batch.lengths.max())
        if longest > self.config.max_length:
            raise ValueError(
                f"the input is {longest} positions (image + prompt) but {self.config.name} takes at most "
                f"{self.config.max_length}; shorten the prompt"
            )
        return batch, all_ids

    # ---- training --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        lengths: torch.Tensor,
        pixel_values=None,
        image_rows: torch.Tensor | None = None,
        image_at: torch.Tensor | None = None,
    ) -> LossSum:
        """The training forward of a collated batch (`mambavl.data.collate`): text ids and labels [B, T]
        right-padded to `lengths`; the images of rows `image_rows` (single-view: stacked pixels; AnyRes:
        a list of images) spliced in before text position `image_at[row]`. Returns the summed
        next-token cross-entropy and the number of learned tokens, so callers normalise over a whole
        global batch however it is split into micro-batches and processes."""
        B = input_ids.shape[0]
        # the host reads the small index tensors before it queues the towers, not after (a read waits
        # for the GPU, which then idles while the host catches up)
        with_image = [] if image_rows is None else image_rows.tolist()
        at = [0] * B if image_at is None else image_at.tolist()
        n = lengths.tolist()
        text = self.lm.embed(input_ids)
        images: list[torch.Tensor | None] = [None] * B
        if with_image:
            if isinstance(pixel_values, list):
                encoded = self.image_embeddings(pixel_values)
            else:
                encoded = list(self.encode_images(pixel_values))
            for row, emb in zip(with_image, encoded, strict=True):
                images[row] = emb
        batch = pack([text[b, : n[b]] for b in range(B)], images, [labels[b, : n[b]] for b in range(B)], at)
        hidden = self.lm(inputs_embeds=batch.embeds, return_hidden=True)
        # Position t predicts label t + 1; the head runs only where something is learned.
        targets = batch.labels[:, 1:].to(hidden.device)
        learn = targets != IGNORE_INDEX
        logits = self.lm.lm_head(hidden[:, :-1][learn]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[learn], reduction="sum")
        return LossSum(loss, int(learn.sum()))

    # ---- generation ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image, prompt_text, **kwargs) -> str | list[str]:
        """Text continuing `prompt_text` (build it with `get_prompt_builder()`), given `image`
        (PIL image, path, bytes, or None for text only). Lists of images and prompts are generated as
        one batch, equal to generating them one by one (greedy).

        Keyword arguments: those of `SamplingParams` (max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty, min_length, stop, seed, cuda_graphs). On a GPU, decoding replays a
        captured CUDA graph per step (`vlm.graphs`); the seeds' `cg=False` / `use_cache=False` turn that
        off, as `cuda_graphs=False` does.
        """
        batched = isinstance(prompt_text, list | tuple)
        images = list(image) if batched else [image]
        prompts = list(prompt_text) if batched else [prompt_text]
        if len(images) != len(prompts):
            raise ValueError(
                f"{len(images)} images for {len(prompts)} prompts: pass one image (or None) per prompt"
            )
        texts = [""] * len(prompts)
        for _ in self._engine_steps(images, prompts, _params(kwargs), texts):
            pass
        return texts if batched else texts[0]

    @torch.inference_mode()
    def stream(self, image, prompt_text: str, **kwargs) -> Iterator[str]:
        """Yields the generated text piece by piece (same arguments as `generate`, one prompt); the pieces
        join into what `generate` returns."""
        text = [""]
        sent = 0
        for _ in self._engine_steps([image], [prompt_text], _params(kwargs), text):
            if len(text[0]) > sent:
                yield text[0][sent:]
                sent = len(text[0])

    @torch.inference_mode()
    def option_probabilities(self, images: list, prompts: list[str], options: list) -> list[dict[str, float]]:
        """For each prompt, the probability of each of its options as the answer, from the first token the
        model would generate (the seeds' harness "probability" mode for yes/no, true/false and A–D):
        softmax over the options' first-token logits. Options whose first tokens coincide cannot be told
        apart this way and are refused."""
        if not (len(images) == len(prompts) == len(options)):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(options)} option lists")
        logits = self.prefill_prompts(images, prompts)[1].float()
        out = []
        for row, choices in zip(logits, options, strict=True):
            firsts = []
            for option in choices:
                ids = self.tokenizer.encode(option)
                if not ids:
                    raise ValueError(f"option {option!r} encodes to no tokens")
                firsts.append(ids[0])
            if len(set(firsts)) != len(firsts):
                raise ValueError(
                    f"options {list(choices)} share a first token: their probabilities would tie"
                )
            probs = torch.softmax(row[torch.tensor(firsts, device=row.device)], dim=-1).tolist()
            out.append(dict(zip(choices, probs, strict=True)))
        return out

    def prefill_prompts(self, images: list, prompts: list[str]):
        """Rows of (image or None, prompt) prefilled together: (their state, next-token logits [B, V],
        the packed batch, each row's prompt ids)."""
        batch, prompt_ids = self.prepare(images, prompts)
        state = self.lm.new_state(len(prompts))
        hidden = self.prefill(batch.embeds.to(self.device), batch.lengths.to(self.device), state)
        return state, self.lm.lm_head(hidden), batch, prompt_ids

    def prefill(
        self, embeds: torch.Tensor, lengths: torch.Tensor | list[int], state, graphs: bool = True
    ) -> torch.Tensor:
        """Runs right-padded rows [B, L, D] (real lengths [B]) into `state`, a chunk of positions at a time
        (`prefill_chunk`); returns each row's final hidden state [B, D] (at its last real position). A small
        call (one row of up to 2,048 positions, or a few rows of up to 4,096 padded positions in all) replays
        a CUDA graph where the model allows it and `graphs` is on (`vlm.prefill_graphs`): at that size an
        eager forward waits on its kernel launches. The lengths are read on the host once (given as a host
        list, never): the chunks' masks and the rows' ends come from there, and nothing else is read back
        from the device."""
        B, L = embeds.shape[:2]
        host = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(host) != B or (host and (min(host) < 0 or max(host) > L)):
            raise ValueError(f"lengths must be [{B}] integers in [0, {L}], got {host}")
        small = graphs and not torch.is_grad_enabled() and B * L <= PREFILL_POSITIONS
        captured = self.prefill_graphs() if small else None
        if captured is not None and captured.bucket(B, L) is not None:
            try:
                return captured(embeds, state, to_device(host, embeds.device)).to(embeds.dtype)
            except GraphCaptureError as e:  # the state is untouched: this model prefills eagerly from now on
                self._graphs_failed("_prefill_graphs", "prefill runs eagerly", e)
        budget = self.prefill_chunk
        chunk = L if budget is None else max(budget // B, min(512, budget))
        last = embeds.new_zeros(B, self.config.lm.d_model)
        for start in range(0, L, chunk):
            piece = embeds[:, start : start + chunk]
            end = start + piece.shape[1]
            counts = [min(max(m - start, 0), piece.shape[1]) for m in host]
            mask = None  # every row real to the chunk's end: the layers' unpadded path
            if counts and min(counts) < piece.shape[1]:
                positions = torch.arange(piece.shape[1], device=embeds.device)
                mask = positions[None, :] < to_device(counts, embeds.device)[:, None]
            hidden = self.lm(inputs_embeds=piece, state=state, mask=mask, return_hidden=True)
            ends = [(b, m - start - 1) for b, m in enumerate(host) if start < m <= end]
            if ends:  # the rows that end in this chunk, at their last real position
                rows, at = (to_device(list(column), embeds.device) for column in zip(*ends, strict=True))
                last[rows] = hidden[rows, at].to(last.dtype)
        return last

    def _engine_steps(self, images: list, prompts: list[str], params: SamplingParams, texts: list[str]):
        """Decodes the rows through the engine (`mambavl.engine.scheduler`) in this thread, appending each
        row's text to `texts` as it comes; yields after every engine step. Bad input raises ValueError."""
        from mambavl.engine.scheduler import Delta, Engine, EngineConfig, Failed, Request

        batch = len(prompts)
        failures: list = []

        def sink(b: int):
            def take(event) -> None:
                if isinstance(event, Delta):
                    texts[b] += event.text
                elif isinstance(event, Failed):
                    failures.append(event)

            return take

        decoder = self.graph_decoder(batch) if params.cuda_graphs else None
        config = EngineConfig(
            slots=batch, max_queue=batch, prefill_batch=batch, prefill_tokens=None, timeout=None,
            cuda_graphs=params.cuda_graphs, switch_interval=None, prefix_cache_gb=0.0,
        )  # fmt: skip
        engine = Engine(self, config, decoder=decoder)
        requests = []
        for b in range(batch):  # images read and prompts checked here: bad input raises its own error
            image = None if images[b] is None else self.preprocess(images[b])
            tokens = engine.encode(prompts[b], image)
            requests.append(Request(image, prompts[b], params, sink(b), tokens=tokens))
        for _ in engine.steps(requests):
            if failures:
                break
            yield
        if failures:
            failed = failures[0]
            raise (ValueError if failed.status == 400 else RuntimeError)(failed.message)

    def prefill_graphs(self) -> PrefillGraphs | None:
        """The CUDA graphs of small prefills (kept between calls, each captured when a call first needs it),
        or None where they do not apply (CPU, attention or expert layers)."""
        current = getattr(self, "_prefill_graphs", None)
        if current is False or prefill_graph_support(self.lm) is not None:  # False: a capture failed
            return None
        if current is None or not current.valid_for(self.lm):
            self._prefill_graphs = None  # free the old graphs' memory before capturing new ones
            current = self._prefill_graphs = PrefillGraphs(self.lm)
        return current

    def _graphs_failed(self, attribute: str, outcome: str, error: GraphCaptureError) -> None:
        """A capture failed: warns once, and that part of the model runs eagerly from now on."""
        warnings.warn(f"{outcome}: {error}", RuntimeWarning, stacklevel=3)
        setattr(self, attribute, False)

    def warm_graphs(self) -> None:
        """Captures every prefill graph and the towers' graph of every batch size now (e.g. before serving);
        a capture that fails warns once and that part runs eagerly from then on."""
        if (graphs := self.prefill_graphs()) is not None:
            try:
                with torch.inference_mode():
                    graphs.warm()
            except GraphCaptureError as e:
                self._graphs_failed("_prefill_graphs", "prefill runs eagerly", e)
        if (towers := self.tower_graphs()) is not None:
            from PIL import Image

            view = self.preprocess(Image.new("RGB", (self.vision.image_size,) * 2)).views[0]
            with torch.inference_mode():
                for rows in towers.rows:
                    self.encode_images(self._stack([view] * rows))

    def graph_decoder(self, batch: int) -> GraphDecoder | KVGraphDecoder | None:
        """The CUDA-graph decoder for `batch` rows (kept between calls), or None where graphs do not apply
        (CPU, or MoE layers over too many rows: see `vlm.graphs.graph_support`)."""
        if graph_support(self.lm, max(batch, 8)) is not None:
            return None
        current = getattr(self, "_graphs", None)
        if current is None or not current.valid_for(self.lm, batch):
            self._graphs = None  # free the old graphs' memory before capturing new ones
            current = self._graphs = graph_decoder(self.lm, max(batch, 8))
        return current


def build_tower(name: str, pretrained: bool, feature_layer: int | None = None, options: dict | None = None):
    """A tower with timm's pretrained weights, or else a fixed random init: layouts that do not store
    vision weights (Cobra's, ML-Mamba's) then rebuild the same tiny tower every time."""
    if pretrained:
        return create_tower(name, pretrained=True, feature_layer=feature_layer, options=options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_tower(name, pretrained=False, feature_layer=feature_layer, options=options)


def _shape(view) -> tuple:
    return (
        tuple(sorted((k, tuple(v.shape)) for k, v in view.items()))
        if isinstance(view, dict)
        else tuple(view.shape)
    )


def _params(kwargs: dict) -> SamplingParams:
    # The seeds' CUDA-graph flags: `cg` (their README) and `use_cache` (their code). Either set to
    # False decodes eagerly; decoding always runs on the recurrent state.
    graphs = all(bool(kwargs.pop(k, True)) for k in ("cg", "use_cache"))
    kwargs.setdefault("cuda_graphs", graphs)
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        known = sorted(SamplingParams.__dataclass_fields__)
        raise TypeError(f"{e}; generate takes {known} (and the seeds' cg / use_cache)") from None


# ---- building a preset -----------------------------------------------------------------------------------
def create(preset: str, device=None, dtype: torch.dtype | None = None) -> VLM:
    """A VLM of a named preset with random weights (`device="meta"` builds it without memory)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    with torch.device(device or "cpu"):
        vlm = VLM(PRESETS[preset])
    if dtype is not None:
        vlm = vlm.to(dtype)
    return vlm.eval()


def create_from_parts(config: VLMConfig, dtype: torch.dtype | None = None) -> VLM:
    """A preset as the seeds start training it: pretrained vision tower(s) (timm), the pretrained LM
    (`lm_hub_id`, HF cache first), a freshly initialised projector."""
    from mambavl.lm.load import load_lm

    if config.lm_hub_id is None:
        raise ValueError(f"{config.name} names no pretrained LM (lm_hub_id): it trains from random weights")
    vlm = VLM(config, pretrained_tower=True)
    lm = load_lm(config.lm_hub_id, dtype=torch.float32)
    if lm.config != config.lm:
        raise ValueError(f"{config.lm_hub_id}'s config does not match {config.name}'s LM")
    vlm.lm = lm
    return vlm if dtype is None else vlm.to(dtype)
