"""A synthetic visual question answering dataset: scenes of coloured shapes in a 2×2 grid, with questions
about colour, shape, count, spatial relation and existence (POPE-style yes/no, balanced, with negatives
that change one attribute of an object in the scene, so the answer needs the image, not priors).

Everything is generated from a seed; the held-out split uses scenes that never occur in training. The
files are ordinary LLaVA-format JSON plus PNG images, read by the same pipeline as any real dataset.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # (row, column) = divmod(cell, 2)
QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists")


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    cell: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = tuple[Thing, ...]


def random_scene(rng: random.Random) -> Scene:
    """1–4 objects, each a distinct colour–shape pair, in distinct cells."""
    n = rng.randint(1, 4)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    cells = rng.sample(range(4), n)
    return tuple(
        sorted((Thing(c, s, cell) for (c, s), cell in zip(pairs, cells, strict=True)), key=lambda t: t.cell)
    )


def draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """The scene on a light background; positions and sizes jitter inside each cell."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    half = size / 2
    for thing in scene:
        row, col = divmod(thing.cell, 2)
        extent = half * rng.uniform(0.55, 0.8)
        x0 = col * half + rng.uniform(0.05 * half, half - extent - 0.05 * half)
        y0 = row * half + rng.uniform(0.05 * half, half - extent - 0.05 * half)
        box = (x0, y0, x0 + extent, y0 + extent)
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif thing.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    """The align stage's caption: every object and where it is."""
    return "; ".join(f"a {t.name} at the {CELLS[t.cell]}" for t in scene) + "."


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) for each question type the scene supports."""
    out = []
    shapes = Counter(t.shape for t in scene)
    colours = Counter(t.colour for t in scene)
    unique_shape = [t for t in scene if shapes[t.shape] == 1]
    if unique_shape:
        t = rng.choice(unique_shape)
        out.append(("colour", f"What color is the {t.shape}?", t.colour))
    unique_colour = [t for t in scene if colours[t.colour] == 1]
    if unique_colour:
        t = rng.choice(unique_colour)
        out.append(("shape", f"What shape is the {t.colour} object?", t.shape))
    out.append(("count", "How many objects are there?", str(len(scene))))
    pairs = [(a, b) for a in scene for b in scene if a.cell % 2 != b.cell % 2]
    if pairs:
        a, b = rng.choice(pairs)
        answer = "left" if a.cell % 2 < b.cell % 2 else "right"
        out.append(("spatial", f"Is the {a.name} left or right of the {b.name}?", answer))
    # POPE-style existence, balanced: a present object, or one with one attribute changed (absent).
    t = rng.choice(scene)
    if rng.random() < 0.5:
        out.append(("exists", f"Is there a {t.name} in the image?", "yes"))
    else:
        present = {(x.colour, x.shape) for x in scene}
        absent = [(c, t.shape) for c in COLOURS] + [(t.colour, s) for s in SHAPES]
        absent = [p for p in absent if p not in present]
        c, s = rng.choice(absent)
        out.append(("exists", f"Is there a {c} {s} in the image?", "no"))
    return out


def write_shapes(
    out: str | Path,
    train_scenes: int = 1200,
    heldout_scenes: int = 200,
    image_size: int = 112,
    seed: int = 0,
    image_last: bool = False,
) -> dict[str, Path]:
    """Writes `images/`, `align.json` (captions), `finetune.json` (one sample per question) and
    `heldout.json` (questions on scenes never seen in training) under `out`; returns their paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[Scene] = set()
    splits: dict[str, list[Scene]] = {"train": [], "heldout": []}
    for split, count in (("train", train_scenes), ("heldout", heldout_scenes)):
        while len(splits[split]) < count:
            scene = random_scene(rng)
            if scene not in seen:  # held-out scenes are new arrangements, not re-drawn training ones
                seen.add(scene)
                splits[split].append(scene)
    records: dict[str, list[dict]] = {"align": [], "finetune": [], "heldout": []}
    for split, scenes in splits.items():
        for i, scene in enumerate(scenes):
            name = f"{split}-{i:05d}.png"
            draw(scene, image_size, rng).save(out / "images" / name)
            if split == "train":
                records["align"].append(
                    _record(f"{split}-{i}-caption", name, "Describe the image.", caption(scene))
                )
            asked = questions(scene, rng)
            if split == "train":  # one multi-turn conversation per image, questions in random order
                rng.shuffle(asked)
                records["finetune"].append(_conversation(f"{split}-{i}", name, asked, image_last))
            else:  # one question per sample, scored on its own
                for kind, question, answer in asked:
                    records["heldout"].append(
                        _conversation(f"{split}-{i}-{kind}", name, [(kind, question, answer)], image_last)
                    )
    paths = {}
    for key, rows in records.items():
        paths[key] = out / f"{key}.json"
        paths[key].write_text(json.dumps(rows, indent=0))
    paths["images"] = out / "images"
    return paths


def _record(sid: str, image: str, question: str, answer: str) -> dict:
    return {
        "id": sid,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _conversation(sid: str, image: str, asked: list[tuple[str, str, str]], image_last: bool) -> dict:
    turns = []
    for n, (_, question, answer) in enumerate(asked):
        if n == 0:
            question = f"{question}\n<image>" if image_last else f"<image>\n{question}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": sid, "image": image, "conversations": turns, "types": [kind for kind, _, _ in asked]}
