"""A synthetic visual question answering dataset: scenes of 1–4 coloured shapes on a 4×4 grid, with
questions about colour, shape, count, side (spatial) and existence (POPE-style yes/no, balanced, the
negatives absent objects). Every answer is uniform over its choices
across scenes, so no prior answers them: only the image does.

Everything is generated from a seed; the held-out split uses scenes that never occur in training. The
files are ordinary LLaVA-format JSON plus PNG images, read by the same pipeline as any real dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# A 4 × 4 grid of cells: at the tiny towers' 56 px (patch 14) each cell is exactly one patch, so every
# object lies whole inside one patch.
GRID = 4
SIDES = ("left", "right")
QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists")


@dataclass(frozen=True)
class Scene:
    """1–4 objects of one colour and one shape, all on one side (two columns) of the image."""

    colour: str
    shape: str
    side: str
    cells: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.cells)


def random_scene(rng: random.Random) -> Scene:
    side = rng.choice(SIDES)
    columns = (0, 1) if side == "left" else (2, 3)
    free = [r * GRID + c for r in range(GRID) for c in columns]
    cells = tuple(sorted(rng.sample(free, rng.randint(1, 4))))
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), side, cells)


def draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """The scene on a light background; positions and sizes jitter inside each cell."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    cell = size / GRID
    fill = COLOURS[scene.colour]
    for where in scene.cells:
        row, col = divmod(where, GRID)
        extent = cell * rng.uniform(0.8, 0.92)
        x0 = col * cell + rng.uniform(0.05 * cell, cell - extent - 0.05 * cell)
        y0 = row * cell + rng.uniform(0.05 * cell, cell - extent - 0.05 * cell)
        box = (x0, y0, x0 + extent, y0 + extent)
        if scene.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif scene.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    """The align stage's caption: what, how many, where."""
    noun = scene.shape if scene.count == 1 else f"{scene.shape}s"
    return f"{scene.count} {scene.colour} {noun} on the {scene.side}."


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer), one of each type."""
    out = [
        ("colour", "What color are the objects?", scene.colour),
        ("shape", "What shape are the objects?", scene.shape),
        ("count", "How many objects are there?", str(scene.count)),
        ("spatial", "Are the objects on the left or on the right?", scene.side),
    ]
    # POPE-style existence ("random" negatives), balanced: the scene's object, or an absent one.
    if rng.random() < 0.5:
        out.append(("exists", f"Is there a {scene.colour} {scene.shape}?", "yes"))
    else:
        colour = rng.choice([c for c in COLOURS if c != scene.colour])
        shape = rng.choice([s for s in SHAPES if s != scene.shape])
        out.append(("exists", f"Is there a {colour} {shape}?", "no"))
    return out


def write_shapes(
    out: str | Path,
    train_scenes: int = 1000,
    heldout_scenes: int = 200,
    image_size: int = 112,
    seed: int = 0,
    multi_turn: bool = True,
) -> dict[str, Path]:
    """Writes `images/`, `align.json` (a caption per training image), `finetune.json` (one conversation
    with every question per training image, or one sample per question) and `heldout.json` (one sample
    per question on scenes never seen in training) under `out`; returns their paths."""
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
            asked = questions(scene, rng)
            rng.shuffle(asked)
            if split == "train":
                records["align"].append(
                    _conversation(
                        f"{split}-{i}-caption", name, [("caption", "Describe the image.", caption(scene))]
                    )
                )
            if split == "train" and multi_turn:
                records["finetune"].append(_conversation(f"{split}-{i}", name, asked))
            else:
                target = records["finetune" if split == "train" else "heldout"]
                target += [_conversation(f"{split}-{i}-{one[0]}", name, [one]) for one in asked]
    paths = {}
    for key, rows in records.items():
        paths[key] = out / f"{key}.json"
        paths[key].write_text(json.dumps(rows, indent=0))
    paths["images"] = out / "images"
    return paths


def _conversation(sid: str, image: str, asked: list[tuple[str, str, str]]) -> dict:
    turns = []
    for n, (_, question, answer) in enumerate(asked):
        turns.append({"from": "human", "value": f"<image>\n{question}" if n == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": sid, "image": image, "conversations": turns, "types": [kind for kind, _, _ in asked]}
