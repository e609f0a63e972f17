"""Prefill that resumes from the prefix-state cache.

Each row's prompt is a sequence of items (token ids, and its image as one item where it goes). The row
resumes from the longest cached prefix of that sequence and prefills only the rest, in two phases that
batch across rows: first up to and including the image (where the image is not cached), whose state is
then kept as a snapshot (every later question about the same image starts there), then to the end of the
prompt, kept as well (a repeated or extended prompt starts there). Rows start from different states and
lengths; the LM's ragged prefill makes padding exact identity steps, so batching never changes a row's
result, and a resumed row's state equals the state of prefilling it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambavl.engine.prefix_cache import Item, PrefixCache, Snapshot, image_item
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
    key = image_item(image.views, image.size, image.grid)
    if vlm.config.image_placement == "placeholder":
        return [*tokens.before, key, *tokens.after], len(tokens.before)
    return [key, *tokens.before], 0


@dataclass
class _Row:
    items: list[Item]
    image_at: int | None
    start: int  # items already in the state (from the cache)
    state: LMState
    logits: torch.Tensor | None  # after `start` items (None: nothing consumed yet)
    positions: int  # positions consumed so far
    cached: int  # of which from the cache


def prefill(
    vlm: VLM, images: list[PreparedImage | None], prompts: list[PromptIds], cache: PrefixCache | None
) -> Prefilled:
    """Prefills rows of (prepared image or None, tokenized prompt), resuming each from `cache` (None: no
    cache) and keeping its new boundaries there."""
    if len(images) != len(prompts):
        raise ValueError("prefill needs one image (or None) per prompt")
    device = vlm.device
    rows: list[_Row] = []
    for image, tokens in zip(images, prompts, strict=True):
        items, image_at = prompt_items(vlm, image, tokens)
        if not items:
            raise ValueError("a prompt is empty and has no image: there is nothing to continue from")
        hit = cache.lookup(items, device) if cache is not None else None
        if hit is None:
            rows.append(_Row(items, image_at, 0, vlm.lm.new_state(1), None, 0, 0))
        else:
            n, snap = hit
            state = snap.state.clone()  # the cache keeps its copy untouched
            rows.append(_Row(items, image_at, n, state, snap.logits.clone(), snap.positions, snap.positions))
    with_image = [j for j, r in enumerate(rows) if r.image_at is not None and r.start <= r.image_at]
    encoded = vlm.image_embeddings([images[j] for j in with_image]) if with_image else []
    embeddings = dict(zip(with_image, encoded, strict=True))
    for j, r in enumerate(rows):
        rest = len(r.items) - r.start + (embeddings[j].shape[0] - 1 if j in embeddings else 0)
        if r.positions + rest > vlm.config.max_length:
            raise ValueError(
                f"the input is {r.positions + rest} positions (image + prompt) but {vlm.config.name} takes "
                f"at most {vlm.config.max_length}; shorten the prompt"
            )
    if cache is not None and with_image:  # phase 1: through the image, kept as a snapshot
        first = [rows[j] for j in with_image]
        _advance(vlm, first, [r.image_at + 1 for r in first], [embeddings[j] for j in with_image])
        for r in first:
            cache.insert(r.items[: r.start], Snapshot(r.state.clone(), r.logits.clone(), r.positions))
    # phase 2: to the end of every prompt
    todo = [j for j, r in enumerate(rows) if r.start < len(r.items)]
    if todo:
        rest = [rows[j] for j in todo]
        _advance(vlm, rest, [len(r.items) for r in rest], [embeddings.get(j) for j in todo])
        if cache is not None:
            for r in rest:
                cache.insert(r.items, Snapshot(r.state.clone(), r.logits.clone(), r.positions))
    return Prefilled(
        states=[r.state for r in rows],
        logits=torch.stack([r.logits for r in rows]),
        positions=[r.positions for r in rows],
        cached=[r.cached for r in rows],
        prompt_ids=[list(t.ids) for t in prompts],
    )


def _embed(vlm: VLM, row: _Row, end: int, image: torch.Tensor | None) -> torch.Tensor:
    """The embeddings of row.items[row.start:end] [T, d_model] (the image's where its item is)."""
    parts, run = [], []

    def flush():
        if run:
            ids = torch.tensor([run], dtype=torch.long, device=vlm.device)
            parts.append(vlm.lm.embed(ids)[0])
            run.clear()

    for i in range(row.start, end):
        if i == row.image_at:
            flush()
            parts.append(image.to(vlm.device))
        else:
            run.append(row.items[i])
    flush()
    dtype = parts[0].dtype if len(parts) == 1 else vlm.lm.dtype
    return torch.cat([p.to(dtype) for p in parts])


def _advance(vlm: VLM, rows: list[_Row], ends: list[int], images: list[torch.Tensor | None]) -> None:
    """Feeds each row its items up to `end` (the image's embedding where its item is), from the row's
    state, all rows in one right-padded batch."""
    embeds = [_embed(vlm, r, end, image) for r, end, image in zip(rows, ends, images, strict=True)]
    lengths = torch.tensor([e.shape[0] for e in embeds], device=vlm.device)
    batch = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
    state = LMState.stack([r.state for r in rows])
    hidden = vlm.prefill(batch, lengths, state)
    logits = vlm.lm.lm_head(hidden).float()
    for b, (r, end) in enumerate(zip(rows, ends, strict=True)):
        r.state = state.select([b])
        r.logits = logits[b]
        r.positions += int(lengths[b])
        r.start = end
