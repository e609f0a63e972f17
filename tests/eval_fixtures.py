"""Tiny copies of each benchmark's official files (2-6 questions, 8x8 images), written under a directory;
each writer returns the data root its benchmark reads."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> Path:
    """A tiny image; the format follows the suffix (JPEG without one, as SEED-Bench's CC3M images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=None if path.suffix else "JPEG")
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def vqa_answers(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def vqav2(root: Path) -> Path:
    questions = [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
        {"image_id": 7, "question": "How many dogs are there?", "question_id": 7001},
    ]
    annotations = [
        {
            "question_id": 42000,
            "image_id": 42,
            "answer_type": "other",
            "question_type": "what color is the",
            "multiple_choice_answer": "red",
            "answers": vqa_answers(*["red"] * 9, "maroon"),
        },
        {
            "question_id": 7001,
            "image_id": 7,
            "answer_type": "number",
            "question_type": "how many",
            "multiple_choice_answer": "2",
            "answers": vqa_answers(*["2"] * 10),
        },
    ]
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"questions": questions, "task_type": "Open-Ended"},
    )
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    for image_id in (42, 7):
        image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


def gqa(root: Path) -> Path:
    write_json(
        root / "testdev_balanced_questions.json",
        {
            "201307251": {
                "imageId": "n15740",
                "question": "Is the sky blue?",
                "answer": "yes",
                "fullAnswer": "Yes.",
            },
            "20968379": {"imageId": "n288870", "question": "What is on the table?", "answer": "cup"},
        },
    )
    image(root / "images" / "n15740.jpg")
    image(root / "images" / "n288870.jpg")
    return root


def textvqa(root: Path) -> Path:
    data = [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what brand is this?"},
        {"question_id": 34603, "image_id": "00685bc495504d61", "question": "what number is on the shirt?"},
    ]
    data[0]["answers"] = ["nokia"] * 8 + ["nokia phone"] * 2
    data[1]["answers"] = ["23"] * 10
    write_json(
        root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    )
    write_json(
        root / "TextVQA_Rosetta_OCR_v0.2_val.json",
        {
            "data": [
                {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["NOKIA", "menu"]},
                {"image_id": "00685bc495504d61", "ocr_tokens": []},
            ]
        },
    )
    for d in data:
        image(root / "train_images" / f"{d['image_id']}.jpg")
    return root


def vizwiz(root: Path) -> Path:
    write_json(
        root / "Annotations" / "val.json",
        [
            {
                "image": "VizWiz_val_00000000.jpg",
                "question": "What is this?",
                "answers": vqa_answers(*["soap"] * 6, *["unanswerable"] * 4),
                "answer_type": "other",
                "answerable": 1,
            },
            {
                "image": "VizWiz_val_00000001.jpg",
                "question": "What does the label say?",
                "answers": vqa_answers(*["unanswerable"] * 10),
                "answer_type": "unanswerable",
                "answerable": 0,
            },
        ],
    )
    image(root / "val" / "VizWiz_val_00000000.jpg")
    image(root / "val" / "VizWiz_val_00000001.jpg")
    return root


POPE_ROWS = [
    {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?",
    },
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?"},
    {"question_id": 3, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a car in the image?"},
    {"question_id": 4, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a cat in the image?"},
]
POPE_LABELS = ["yes", "no", "yes", "no"]


def pope(root: Path) -> Path:
    for split in ("random", "popular", "adversarial"):
        rows = [r | {"label": label} for r, label in zip(POPE_ROWS, POPE_LABELS, strict=True)]
        write_jsonl(root / f"coco_pope_{split}.json", rows)
    for name in {r["image"] for r in POPE_ROWS}:
        image(root / "val2014" / name)
    return root


def mme(root: Path) -> Path:
    """Two subtasks in the two layouts of the release: `artwork` (images/ + questions_answers_YN/) and
    `count` (images and .txt side by side)."""
    release = root / "MME_Benchmark_release_version"
    yn = release / "artwork" / "questions_answers_YN"
    yn.mkdir(parents=True)
    (yn / "10002.txt").write_text(
        "Is this artwork created by donatello? Please answer yes or no.\tYes\n"
        "Is this artwork created by van gogh? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    image(release / "artwork" / "images" / "10002.jpg")
    (release / "count" / "000000006040.txt").parent.mkdir(parents=True)
    (release / "count" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Are there two trains in this image? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    image(release / "count" / "000000006040.png")
    return root


def vsr(root: Path) -> Path:
    write_jsonl(
        root / "zeroshot" / "test.jsonl",
        [
            {"image": "000000085637.jpg", "caption": "The cat is on the bed.", "label": 1, "relation": "on"},
            {
                "image": "000000085637.jpg",
                "caption": "The cat is under the bed.",
                "label": 0,
                "relation": "under",
            },
        ],
    )
    image(root / "images" / "000000085637.jpg")
    return root


def ai2d(root: Path) -> Path:
    write_jsonl(
        root / "ai2d" / "test.jsonl",
        [
            {
                "question_id": "4016.q1",
                "image": "images/4016.png",
                "question": "Which stage comes after the egg?",
                "options": ["adult", "larva", "pupa", "nymph"],
                "answer": 1,
            },
            {
                "question_id": "4017.q0",
                "image": "images/4017.png",
                "question": "What eats grass?",
                "options": ["hawk", "rabbit", "snake"],
                "answer": "1",
            },
        ],
    )
    image(root / "ai2d" / "images" / "4016.png")
    image(root / "ai2d" / "images" / "4017.png")
    return root


def tallyqa(root: Path) -> Path:
    write_json(
        root / "test.json",
        [
            {
                "image": "VG_100K/2410.jpg",
                "question": "How many people are there?",
                "answer": 3,
                "issimple": True,
                "question_id": 10,
            },
            {
                "image": "train2014/COCO_train2014_000000000009.jpg",
                "question": "How many cups are left of the plate?",
                "answer": 0,
                "issimple": False,
                "question_id": 11,
            },
        ],
    )
    image(root / "VG_100K" / "2410.jpg")
    image(root / "train2014" / "COCO_train2014_000000000009.jpg")
    return root


def scienceqa(root: Path) -> Path:
    problems = {
        "5": {
            "question": "Which animal's feet are also adapted for swimming?",
            "choices": ["duck", "cat"],
            "answer": 0,
            "hint": "Ducks live near water.",
            "image": "image.png",
            "split": "test",
            "subject": "natural science",
        },
        "8": {
            "question": "Which is a compound sentence?",
            "choices": ["I ran.", "I ran, and she walked.", "Run!"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "split": "test",
            "subject": "language science",
        },
        "9": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None},
        "12": {
            "question": "A train question",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
        },
    }
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"train": ["12"], "val": [], "test": ["5", "8", "9"]})
    image(root / "test" / "5" / "image.png")
    image(root / "test" / "8" / "image.png")
    return root


def _b64_image(fmt: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 120, 200)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]


def mmbench(root: Path) -> Path:
    """Two questions: four options (answer C, JPEG image, a hint) and two (answer A, PNG image, no hint)."""
    rows = [
        ["241", "What is the main color?", "Look at the sky.", "red", "green", "blue", "yellow", "C"],
        ["1032", "Is it day or night?", "nan", "day", "night", "", "", "A"],
    ]
    rows[0] += ["attribute_recognition", _b64_image("JPEG"), "MMBench"]
    rows[1] += ["scene", _b64_image("PNG"), "MMBench"]
    lines = ["\t".join(MMBENCH_HEADER)] + ["\t".join(r) for r in rows]
    (root / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def seed(root: Path) -> Path:
    q = {"choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four", "question_type_id": 5}
    write_json(
        root / "SEED-Bench.json",
        {
            "question_type": {"Instances Counting": 5},
            "questions": [
                q
                | {"question_id": "101669", "data_id": "1454426_2591111986", "data_type": "image"}
                | {"question": "How many towels are in the image?", "answer": "A"},
                q
                | {"question_id": "v200", "data_id": "v200.mp4", "data_type": "video"}
                | {"question": "What happens next?", "answer": "B"},
                q
                | {"question_id": "101670", "data_id": "sa_1001.jpg", "data_type": "image"}
                | {"question": "How many cars?", "answer": "D"},
            ],
        },
    )
    image(root / "SEED-Bench-image" / "1454426_2591111986")
    image(root / "SEED-Bench-image" / "sa_1001.jpg")
    return root


REFCOCO_REFS = [
    {
        "ref_id": 0,
        "image_id": 581857,
        "split": "val",
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "width": 100,
        "height": 80,
        "sentences": [{"sent_id": 0, "sent": "the lady with the blue shirt"}, {"sent_id": 1, "sent": "lady"}],
    },
    {
        "ref_id": 1,
        "image_id": 581857,
        "split": "testA",
        "bbox": [0.0, 0.0, 5.0, 5.0],
        "width": 100,
        "height": 80,
        "sentences": [{"sent_id": 2, "sent": "not in val"}],
    },
]


def refcoco(root: Path) -> Path:
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        write_json(root / dataset / "refs.json", REFCOCO_REFS)
    image(root / "images" / "COCO_train2014_000000581857.jpg", size=(100, 80))
    return root


WRITERS = {
    "vqav2": vqav2,
    "gqa": gqa,
    "textvqa": textvqa,
    "textvqa-ocr": textvqa,
    "vizwiz": vizwiz,
    "pope-random": pope,
    "pope-popular": pope,
    "pope-adversarial": pope,
    "mme": mme,
    "vsr": vsr,
    "ai2d": ai2d,
    "tallyqa": tallyqa,
    "scienceqa": scienceqa,
    "mmbench": mmbench,
    "seed": seed,
    "refcoco": refcoco,
    "refcoco+": refcoco,
    "refcocog": refcoco,
}


def write(name: str, directory: Path) -> Path:
    """The fixture of benchmark `name` under `directory`; returns its data root."""
    directory.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](directory)
