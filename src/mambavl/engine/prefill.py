"""Prefill that resumes from the prefix-state cache, and advances a budget of positions at a time.

Each row's prompt is a sequence of items (token ids, and its image as one item where it goes). The row
resumes from the longest cached prefix of that sequence and prefills only the rest. Where the image is not
cached, the state just after it is kept as a snapshot (every later question about the same image starts
there), and so is the state at the end of the prompt (a repeated or extended prompt starts there).

A `PrefillJob` does the work in steps of at most `budget` positions over all its rows (first come, first
served), so that a scheduler can interleave long prompts with decode steps and no stream waits for a whole
prefill; a step never crosses a snapshot boundary. Rows start from different states and lengths; the LM's
ragged prefill makes padding exact identity steps, so neither batching nor the step size changes a row's
result, and a resumed row's state equals the state of prefilling it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from mambavl.engine.prefix_cache import Item, PrefixCache, Snapshot
from mambavl.lm.state import LMState
from mambavl.vlm.model import VLM, PreparedImage, PromptIds


@dataclass
class Prefilled:
    """Per row: its state (a batch of one), its next-token logits [vocab], all its positions (image +
    tokens) and how many of them came from the cache; and its prompt's token ids."""

    states: list[LMState]
    logits: torch.Tensor  # [B, vocab] fp32
    positions: list[int]
    cached: list[int]
    prompt_ids: list[list[int]]


def prompt_items(vlm: VLM, image: PreparedImage | None, tokens: PromptIds) -> tuple[list[Item], int | None]:
    """A prompt as cache items, and where its image item sits (None without an image)."""
    if image is None:
        return list(tokens.ids), None
    key = ("image", image.digest)
    if vlm.config.image_placement == "placeholder":
        return [*tokens.before, key, *tokens.after], len(tokens.before)
    return [key, *tokens.before], 0


@dataclass
class PrefillRow:
    """One prompt being prefilled: its state so far, and the embeddings still to feed."""

    items: list[Item]
    prompt_ids: list[int]
    state: LMState | None  # None: zeros (nothing fed yet; a step makes the zeros of all such rows at once)
    logits: torch.Tensor | None  # next-token logits after what the state holds (None: nothing yet)
    positions: int  # positions the state holds
    cached: int  # of which resumed from the cache
    pending: torch.Tensor  # [T, d_model] the rest of the prompt's embeddings
    # (offset into `pending`, items covered there) where a snapshot is kept; the last one is the prompt's end
    boundaries: list[tuple[int, int]] = field(default_factory=list)
    fed: int = 0  # positions of `pending` fed so far

    @property
    def done(self) -> bool:
        return self.fed == self.pending.shape[0]


class PrefillJob:
    """Rows of (prepared image or None, tokenized prompt) to prefill: built at once (cache lookups, the
    towers for images not cached, length checks), then advanced by `step`."""

    def __init__(
        self,
        vlm: VLM,
        images: list[PreparedImage | None],
        prompts: list[PromptIds],
        cache: PrefixCache | None,
        graphs: bool = True,
    ):
        """`graphs`: small steps and the towers may replay CUDA graphs (`VLM.prefill`, `encode_images`)."""
        if len(images) != len(prompts):
            raise ValueError("prefill needs one image (or None) per prompt")
        self.vlm, self.cache, self.graphs = vlm, cache, graphs
        plans = []
        with record_function("prefill.lookup"):
            for image, tokens in zip(images, prompts, strict=True):
                items, image_at = prompt_items(vlm, image, tokens)
                if not items:
                    raise ValueError("a prompt is empty and has no image: there is nothing to continue from")
                hit = cache.lookup(items, vlm.device) if cache is not None else None
                plans.append((items, image_at, hit))
        # the towers run for images the cache does not cover (a hit of n items holds the image if n > at)
        encode = [
            j for j, (_, at, hit) in enumerate(plans) if at is not None and (hit is None or hit[0] <= at)
        ]
        with record_function("prefill.towers"):
            encoded = vlm.image_embeddings([images[j] for j in encode], graphs) if encode else []
        embeddings = dict(zip(encode, encoded, strict=True))
        with record_function("prefill.rows"):
            parts = [
                self._parts(items, at, hit, embeddings.get(j)) for j, (items, at, hit) in enumerate(plans)
            ]
            # every row's token ids embedded at once: one copy to the device, not waited for
            runs = [value for pieces, _ in parts for kind, value in pieces if kind == "ids"]
            flat = [i for run in runs for i in run]
            embedded = iter(vlm.lm.embed(flat).split([len(run) for run in runs]))
            self.rows = []
            for (items, _, hit), (pieces, boundaries), tokens in zip(plans, parts, prompts, strict=True):
                feed = [next(embedded) if kind == "ids" else value for kind, value in pieces]
                self.rows.append(self._row(items, hit, feed, boundaries, list(tokens.ids)))

    def _parts(self, items, image_at, hit, image: torch.Tensor | None) -> tuple[list[tuple], list]:
        """What a row still feeds, in order: ("ids", [token ids]) and ("image", embeddings) parts, and
        its snapshot boundaries (offset into what it feeds, items covered there)."""
        start = 0 if hit is None else hit[0]
        parts, run, boundaries, offset = [], [], [], 0
        for i in range(start, len(items)):
            if i == image_at:
                parts.append(("ids", run))
                parts.append(("image", image.to(self.vlm.lm.dtype)))
                offset += len(run) + image.shape[0]
                run = []
                if self.cache is not None and i + 1 < len(items):
                    boundaries.append((offset, i + 1))  # the state just after the image
            else:
                run.append(items[i])
        parts.append(("ids", run))
        return parts, boundaries

    def _row(self, items, hit, embeddings: list[torch.Tensor], boundaries, prompt_ids) -> PrefillRow:
        vlm = self.vlm
        if hit is None:
            state, logits, positions = None, None, 0
        else:
            snap = hit[1]
            state, logits, positions = snap.state.clone(), snap.logits.clone(), snap.positions
        pending = torch.cat(embeddings)
        boundaries.append((pending.shape[0], len(items)))
        total = positions + pending.shape[0]
        if total > vlm.config.max_length:
            raise ValueError(
                f"the input is {total} positions (image + prompt) but {vlm.config.name} takes at most "
                f"{vlm.config.max_length}; shorten the prompt"
            )
        return PrefillRow(items, prompt_ids, state, logits, positions, positions, pending, boundaries)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)

    def step(self, budget: int | None = None) -> int:
        """Feeds up to `budget` positions (None: every row to its next snapshot boundary) over the rows
        that are not done, first rows first, in one batch; keeps the snapshots reached. Returns the
        positions fed."""
        left = budget if budget is not None else float("inf")
        pieces: list[tuple[PrefillRow, int]] = []
        for row in self.rows:
            if row.done:
                continue
            if left <= 0:
                break
            boundary = next(offset for offset, _ in row.boundaries if offset > row.fed)
            n = int(min(boundary - row.fed, left))
            pieces.append((row, n))
            left -= n
        if not pieces:
            return 0
        vlm = self.vlm
        lengths = [n for _, n in pieces]  # on the host: the prefill never waits for the device
        embeds = torch.nn.utils.rnn.pad_sequence(
            [row.pending[row.fed : row.fed + n] for row, n in pieces], batch_first=True
        )
        if all(row.state is None for row, _ in pieces):
            state = vlm.lm.new_state(len(pieces))
        else:
            state = LMState.stack([vlm.lm.new_state(1) if r.state is None else r.state for r, _ in pieces])
        with record_function("prefill.lm"):
            hidden = vlm.prefill(embeds, lengths, state, self.graphs)
            logits = vlm.lm.lm_head(hidden).float()
        # each row's state: views of the batch's row (its next step stacks a copy; a snapshot clones it),
        # one split a tensor for all the rows rather than a slice a tensor a row
        rows = state.map(lambda t: t.split(1)) if len(pieces) > 1 else None
        for b, (row, n) in enumerate(pieces):
            if rows is None:
                row.state = state
            else:
                layers = [{k: views[b] for k, views in layer.items()} for layer in rows.layers]
                row.state = LMState(layers, state.seqlen)
            row.logits = logits[b]
            row.fed += n
            row.positions += n
            reached = [items for offset, items in row.boundaries if offset == row.fed]
            if reached and self.cache is not None:
                with record_function("prefill.snapshot"):
                    snapshot = Snapshot(row.state.clone(), row.logits.clone(), row.positions)
                    self.cache.insert(row.items[: reached[0]], snapshot)
        return sum(lengths)

    def result(self, rows: list[int] | None = None) -> Prefilled:
        """The outcome of `rows` (by index, in that order; None: every row), which must be done."""
        picked = self.rows if rows is None else [self.rows[j] for j in rows]
        if not all(r.done for r in picked):
            raise RuntimeError("the prefill job has rows left: call step() until done")
        return Prefilled(
            states=[r.state for r in picked],
            logits=torch.stack([r.logits for r in picked]),
            positions=[r.positions for r in picked],
            cached=[r.cached for r in picked],
            prompt_ids=[r.prompt_ids for r in picked],
        )


def prefill(
    vlm: VLM, images: list[PreparedImage | None], prompts: list[PromptIds], cache: PrefixCache | None
) -> Prefilled:
    """Prefills rows of (prepared image or None, tokenized prompt) to their ends at once, resuming each
    from `cache` (None: no cache) and keeping its new boundaries there."""
    job = PrefillJob(vlm, images, prompts, cache)
    while not job.done:
        job.step()
    return job.result()
