"""The benchmark registry: one row per benchmark, reading the official files as users download them and
asking with the seeds' prompts (TRI vlm-evaluation's prismatic prompt functions; LLaVA-1.5 where
vlm-evaluation has no such task). Each data root is the benchmark's own download folder.

Prompts are the user message only: the runner adds the image placeholder and the model's chat template.
vlm-evaluation starts each message with "\\n" because its image sits before the text; ours does not.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from mambavl.eval import metrics
from mambavl.eval.base import SHORT_ANSWER, Benchmark, BenchmarkError, Sample, mean, register

MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
YES_NO = "Please answer yes or no."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
TRUE_FALSE = 'Respond with "True" or "False" directly.'


# --- files: where each one comes from, so that a missing or broken file says how to fix it ---------------


class File(NamedTuple):
    path: str  # relative to the data root
    what: str
    source: str


def _require(root: Path, f: File) -> Path:
    path = Path(root) / f.path
    if not path.exists():
        raise BenchmarkError(f"{path}: not found; expected {f.what} here (get it from {f.source})")
    return path


def _json(root: Path, f: File) -> tuple[Path, Any]:
    path = _require(root, f)
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e}); expected {f.what} from {f.source}") from e


def _jsonl(root: Path, f: File) -> tuple[Path, list]:
    path = _require(root, f)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {n} is not valid JSON ({e}); expected {f.what}") from e
    return path, rows


def _get(record: Any, key: str, path: Path, where: str, cast: Callable | None = None) -> Any:
    """record[key] (through `cast`), or an error naming the file, the record and the field."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{path}: {where} is a {type(record).__name__}, expected a JSON object")
    if key not in record:
        raise BenchmarkError(f"{path}: {where} has no field {key!r}")
    try:
        return record[key] if cast is None else cast(record[key])
    except (TypeError, ValueError) as e:
        raise BenchmarkError(f"{path}: {where} field {key!r} = {record[key]!r} is not usable ({e})") from e


def _items(data: Any, key: str | None, path: Path, kind: type = list) -> Any:
    """The top-level list/dict of a file (under `key` when given), or an error saying what was expected."""
    if key is not None:
        data = _get(data, key, path, "the top level")
    if not isinstance(data, kind):
        raise BenchmarkError(
            f"{path}: expected a JSON {kind.__name__} of records, found {type(data).__name__}"
        )
    return data


def _answers(record: Any, path: Path, where: str) -> list[str]:
    """The annotators' answers of a VQA-style record: answers = [{answer: ...}, ...]."""
    return [
        _get(a, "answer", path, f"{where} answer {j}")
        for j, a in enumerate(_get(record, "answers", path, where))
    ]


def letters(n: int) -> tuple[str, ...]:
    return tuple(chr(ord("A") + i) for i in range(n))


# --- prompts ----------------------------------------------------------------------------------------------


def _short_answer(s: Sample) -> str:
    return f"{s.question}\n{SHORT_ANSWER}"


def _vizwiz_prompt(s: Sample) -> str:
    return f"{s.question}\n{UNANSWERABLE}\n{SHORT_ANSWER}"


def _ocr_prompt(s: Sample) -> str:
    # LLaVA-1.5's TextVQA questions (llava_textvqa_val_v051_ocr.jsonl, which vlm-evaluation downloads)
    tokens = s.meta.get("ocr_tokens") or []
    ocr = f"\nReference OCR token: {', '.join(tokens)}" if tokens else ""
    return f"{s.question}{ocr}\n{SHORT_ANSWER}"


def _yes_no_prompt(s: Sample) -> str:
    # MME's own questions already end with the instruction; asking twice would change the benchmark
    return s.question if YES_NO in s.question else f"{s.question}\n{YES_NO}"


def _true_false_prompt(s: Sample) -> str:
    return f'Based on the image, is this statement "True" or "False"? {s.question}\n{TRUE_FALSE}'


def _choice_prompt(s: Sample) -> str:
    context = s.meta.get("context")
    options = [f"{letter}. {text}" for letter, text in zip(letters(len(s.options)), s.options, strict=True)]
    return "\n".join([*([context] if context else []), s.question, *options, MULTIPLE_CHOICE])


def _refer_prompt(s: Sample) -> str:
    return f'Please provide the bounding box coordinate of the region this sentence describes: "{s.question}"'


def _yes_no_choices(s: Sample) -> tuple[str, ...]:
    return ("Yes", "No")  # vlm-evaluation's POPE probabilities


def _letter_choices(s: Sample) -> tuple[str, ...]:
    return letters(len(s.options))


# --- scores and aggregates --------------------------------------------------------------------------------


def _vqa_score(prismatic: str) -> Callable[[str, Sample], dict]:
    """VQA accuracy under the VQA API's current normalisation and under the one the seeds' numbers used
    (vlm-evaluation: LAVIS's for VQAv2, m4c's for TextVQA)."""

    def score(prediction: str, s: Sample) -> dict:
        return {
            "accuracy": float(metrics.vqa_accuracy(prediction, s.answer, standard="official")),
            "accuracy_prismatic": float(metrics.vqa_accuracy(prediction, s.answer, standard=prismatic)),
        }

    return score


def _choice_score(prediction: str, s: Sample) -> dict:
    return {"accuracy": float(metrics.choice_accuracy(prediction, s.options, s.answer))}


def _pope_score(prediction: str, s: Sample) -> dict:
    return {"accuracy": float(metrics.pope_answer(prediction) == metrics.pope_answer(s.answer))}


def _mme_score(prediction: str, s: Sample) -> dict:
    return {"accuracy": float(metrics.mme_answer(prediction) == metrics.mme_answer(s.answer))}


def _tally_score(prediction: str, s: Sample) -> dict:
    # the question is asked as multiple choice over the counts 0..15: a letter stands for its count
    letter = metrics.choice_letter(prediction, s.options)
    count = (
        s.options[letters(len(s.options)).index(letter)] if letter in letters(len(s.options)) else prediction
    )
    return {"accuracy": float(metrics.tally_accuracy(count, s.answer))}


def _by(records: list[dict], group: str, key: str = "accuracy") -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r["meta"][group])].append(r)
    return {g: mean(rs, key) for g, rs in sorted(groups.items())}


def _accuracy(*keys: str, by: str | None = None) -> Callable[[list[dict]], dict]:
    """An aggregate: the mean of each key (default "accuracy"), and per meta[by] group when given."""
    keys = keys or ("accuracy",)

    def aggregate(records: list[dict]) -> dict:
        out = {k: mean(records, k) for k in keys}
        if by is not None:
            out[f"accuracy_by_{by}"] = _by(records, by)
        return out | {"questions": len(records)}

    return aggregate


def _answered(record: dict, wrong: str) -> str:
    """The prediction, or for a sample whose image could not be read (scored as wrong) `wrong`."""
    return wrong if record.get("error") else record["prediction"]


def _pope_aggregate(records: list[dict]) -> dict:
    labels = [r["meta"]["label"] for r in records]
    predictions = [_answered(r, "no" if r["meta"]["label"] == "yes" else "yes") for r in records]
    return metrics.pope_metrics(predictions, labels) | {"questions": len(records)}


def _mme_aggregate(records: list[dict]) -> dict:
    rows: dict[str, list[tuple]] = defaultdict(list)
    for r in records:
        m = r["meta"]
        rows[m["subtask"]].append((m["image"], m["question"], m["label"], _answered(r, "unreadable")))
    subtasks = {name: metrics.mme_subtask_score(rs) for name, rs in sorted(rows.items())}
    return metrics.mme_totals(subtasks) | {"subtasks": subtasks, "questions": len(records)}


def _mmbench_aggregate(records: list[dict]) -> dict:
    # rotation 0 first within each question: the vanilla accuracy is the first answer's
    ordered = sorted(records, key=lambda r: (r["meta"]["index"], r["meta"]["rotation"]))
    results = [(r["meta"]["index"], bool(r["accuracy"])) for r in ordered]
    return metrics.mmbench_circular(results) | {"rotations": len(records)}


# --- readers ----------------------------------------------------------------------------------------------

VISUALQA = "https://visualqa.org/download.html"
COCO_VAL = File("val2014", "the COCO val2014 images", "http://images.cocodataset.org/zips/val2014.zip")

VQAV2_QUESTIONS = File(
    "v2_OpenEnded_mscoco_val2014_questions.json", "the VQAv2 val questions", f"{VISUALQA} (Questions, val)"
)
VQAV2_ANNOTATIONS = File(
    "v2_mscoco_val2014_annotations.json", "the VQAv2 val answers", f"{VISUALQA} (Annotations)"
)


def read_vqav2(root: Path) -> list[Sample]:
    (qpath, qdata), (apath, adata) = _json(root, VQAV2_QUESTIONS), _json(root, VQAV2_ANNOTATIONS)
    questions = {}
    for i, q in enumerate(_items(qdata, "questions", qpath)):
        questions[_get(q, "question_id", qpath, f"question {i}")] = q
    samples = []
    for i, a in enumerate(_items(adata, "annotations", apath)):
        where = f"annotation {i}"
        qid = _get(a, "question_id", apath, where)
        if qid not in questions:
            raise BenchmarkError(f"{apath}: {where} answers question {qid}, which {qpath.name} does not ask")
        q = questions[qid]
        answers = _answers(a, apath, where)
        image_id = _get(q, "image_id", qpath, f"question {qid}", int)
        samples.append(
            Sample(
                id=str(qid),
                image=Path(root) / COCO_VAL.path / f"COCO_val2014_{image_id:012d}.jpg",
                question=_get(q, "question", qpath, f"question {qid}"),
                answer=answers,
                meta={"answer_type": a.get("answer_type", "")},
            )
        )
    return samples


GQA_QUESTIONS = File(
    "testdev_balanced_questions.json",
    "the GQA test-dev balanced questions",
    "https://downloads.cs.stanford.edu/nlp/data/gqa/questions1.2.zip",
)


def read_gqa(root: Path) -> list[Sample]:
    path, data = _json(root, GQA_QUESTIONS)
    samples = []
    for qid, q in _items(data, None, path, dict).items():
        where = f"question {qid}"
        samples.append(
            Sample(
                id=str(qid),
                image=Path(root) / "images" / f"{_get(q, 'imageId', path, where)}.jpg",
                question=_get(q, "question", path, where),
                answer=_get(q, "answer", path, where),
            )
        )
    return samples


TEXTVQA = File("TextVQA_0.5.1_val.json", "the TextVQA 0.5.1 val set", "https://textvqa.org/dataset")
TEXTVQA_OCR = File(
    "TextVQA_Rosetta_OCR_v0.2_val.json",
    "the Rosetta OCR tokens of TextVQA val",
    "https://textvqa.org/dataset",
)


def _ocr_tokens(root: Path) -> dict[str, list[str]]:
    path, data = _json(root, TEXTVQA_OCR)
    tokens = {}
    for i, r in enumerate(_items(data, "data", path)):
        where = f"record {i}"
        if isinstance(r, dict) and "ocr_tokens" not in r and "ocr_info" in r:
            words = [_get(w, "word", path, f"{where} ocr_info") for w in r["ocr_info"]]
        else:
            words = _get(r, "ocr_tokens", path, where, list)
        tokens[str(_get(r, "image_id", path, where))] = words
    return tokens


def read_textvqa(root: Path, ocr: bool = False) -> list[Sample]:
    path, data = _json(root, TEXTVQA)
    tokens = _ocr_tokens(root) if ocr else {}
    samples = []
    for i, q in enumerate(_items(data, "data", path)):
        where = f"record {i}"
        image_id = str(_get(q, "image_id", path, where))
        samples.append(
            Sample(
                id=str(_get(q, "question_id", path, where)),
                image=Path(root) / "train_images" / f"{image_id}.jpg",
                question=_get(q, "question", path, where),
                answer=_get(q, "answers", path, where, list),
                meta={"ocr_tokens": tokens.get(image_id, [])} if ocr else {},
            )
        )
    return samples


VIZWIZ = File(
    "Annotations/val.json", "the VizWiz val annotations", "https://vizwiz.org/tasks-and-datasets/vqa/"
)


def read_vizwiz(root: Path) -> list[Sample]:
    path, data = _json(root, VIZWIZ)
    samples = []
    for i, q in enumerate(_items(data, None, path)):
        where = f"record {i}"
        image = _get(q, "image", path, where)
        answers = _answers(q, path, where)
        samples.append(
            Sample(
                id=image,  # one question per image in VizWiz
                image=Path(root) / "val" / image,
                question=_get(q, "question", path, where),
                answer=answers,
                meta={"answerable": q.get("answerable"), "answer_type": q.get("answer_type", "")},
            )
        )
    return samples


def _pope_file(split: str) -> File:
    return File(
        f"coco_pope_{split}.json",
        f"the POPE COCO {split} questions (JSON lines)",
        "https://github.com/AoiDragon/POPE (output/coco/)",
    )


def read_pope(split: str, root: Path) -> list[Sample]:
    path, rows = _jsonl(root, _pope_file(split))
    samples = []
    for i, q in enumerate(rows, 1):
        where = f"line {i}"
        label = _get(q, "label", path, where, lambda v: str(v).strip().lower())
        if label not in ("yes", "no"):
            raise BenchmarkError(f"{path}: {where} field 'label' = {q['label']!r}, expected 'yes' or 'no'")
        samples.append(
            Sample(
                id=str(_get(q, "question_id", path, where)),
                image=Path(root) / COCO_VAL.path / _get(q, "image", path, where),
                question=_get(q, "text", path, where),
                answer=label,
                meta={"label": label},
            )
        )
    return samples


MME = File(
    "MME_Benchmark_release_version",
    "the MME release folder (one folder per subtask)",
    "the MME authors (https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation)",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


MME_SUBTASKS = metrics.MME_PERCEPTION + metrics.MME_COGNITION


def _mme_folder(root: Path) -> Path:
    """The release folder: the data root itself or its MME_Benchmark_release_version."""
    inner = Path(root) / MME.path
    if not inner.is_dir() and any((Path(root) / name).is_dir() for name in MME_SUBTASKS):
        return Path(root)
    return _require(root, MME)


def _mme_texts(subtask: Path) -> tuple[list[Path], Path]:
    """(question files, image folder) of a subtask in either of the release's two layouts."""
    if (subtask / "questions_answers_YN").is_dir():
        return sorted((subtask / "questions_answers_YN").glob("*.txt")), subtask / "images"
    return sorted(subtask.glob("*.txt")), subtask


def read_mme(root: Path) -> list[Sample]:
    """MME's official subtasks (the ones its eval_tool sums); a subtask folder that is absent is left out
    and the aggregate lists it under `missing`."""
    folder = _mme_folder(root)
    samples = []
    for subtask in (folder / name for name in MME_SUBTASKS if (folder / name).is_dir()):
        texts, images = _mme_texts(subtask)
        found = images.iterdir() if texts and images.is_dir() else ()
        by_stem = {p.stem: p for p in found if p.suffix.lower() in IMAGE_SUFFIXES}
        for txt in texts:
            image = by_stem.get(txt.stem, images / f"{txt.stem}.jpg")
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for n, line in enumerate(lines):
                question, sep, answer = line.rpartition("\t")
                question, answer = question.strip(), answer.strip()
                if not sep or answer.lower() not in ("yes", "no"):
                    raise BenchmarkError(f"{txt}: line {n + 1} is {line!r}, expected 'question<TAB>Yes|No'")
                meta = {"subtask": subtask.name, "image": image.name, "question": question, "label": answer}
                samples.append(Sample(f"{subtask.name}/{txt.stem}/{n}", image, question, answer, meta=meta))
    if not samples:
        raise BenchmarkError(
            f"{folder}: none of MME's subtask folders ({', '.join(MME_SUBTASKS)}) holds question files; "
            f"expected {MME.what} ({MME.source})"
        )
    return samples


VSR = File(
    "zeroshot/test.jsonl",
    "the VSR zero-shot test split (JSON lines)",
    "https://github.com/cambridgeltl/visual-spatial-reasoning (data/splits/zeroshot)",
)


def read_vsr(root: Path) -> list[Sample]:
    path, rows = _jsonl(root, VSR)
    samples = []
    for i, r in enumerate(rows):
        where = f"line {i + 1}"
        samples.append(
            Sample(
                id=str(i),  # VSR rows carry no id; vlm-evaluation numbers them the same way
                image=Path(root) / "images" / _get(r, "image", path, where),
                question=_get(r, "caption", path, where),
                answer=_get(r, "label", path, where, int) == 1,
                meta={"relation": r.get("relation", "")},
            )
        )
    return samples


AI2D = File(
    "ai2d/test.jsonl",
    "the AI2D test questions as JSON lines {image, question, options, answer (index)}",
    "the AI2D test split (ai2d_test_ids.csv) of https://allenai.org/data/diagrams, one line per question, "
    "e.g. exported from the lmms-lab/ai2d dataset",
)


def read_ai2d(root: Path) -> list[Sample]:
    """AI2D's release is one JSON per diagram plus a test-id list; vlm-evaluation flattens it into one row
    per question (question, answer texts, correct index) before evaluating. We read that flat form as JSON
    lines, one question each, images relative to the file's folder: it is what LLaVA-style exports and the
    lmms-lab/ai2d dataset hold, and it keeps one question self-contained per line."""
    path, rows = _jsonl(root, AI2D)
    samples = []
    for i, r in enumerate(rows):
        where = f"line {i + 1}"
        options = tuple(str(o) for o in _get(r, "options", path, where, list))
        answer = _get(r, "answer", path, where, int)
        if not 0 <= answer < len(options):
            raise BenchmarkError(
                f"{path}: {where} answer {answer} is not an index into its {len(options)} options"
            )
        samples.append(
            Sample(
                id=str(r.get("question_id", r.get("id", i))),
                image=path.parent / _get(r, "image", path, where),
                question=_get(r, "question", path, where),
                answer=letters(len(options))[answer],
                options=options,
            )
        )
    return samples


TALLYQA = File("test.json", "the TallyQA test questions", "https://github.com/manoja328/TallyQA_dataset")
TALLY_COUNTS = tuple(str(n) for n in range(16))  # vlm-evaluation asks TallyQA as 16-way multiple choice


def read_tallyqa(root: Path) -> list[Sample]:
    path, data = _json(root, TALLYQA)
    samples = []
    for i, r in enumerate(_items(data, None, path)):
        where = f"record {i}"
        question = _get(r, "question", path, where)
        samples.append(
            Sample(
                id=str(r.get("question_id", i)),
                image=Path(root) / _get(r, "image", path, where),
                question=question,
                answer=_get(r, "answer", path, where, int),
                options=TALLY_COUNTS,
                meta={"split": "simple" if _get(r, "issimple", path, where) else "complex"},
            )
        )
    return samples


SQA = "https://github.com/lupantech/ScienceQA (data/scienceqa)"
SQA_PROBLEMS = File("problems.json", "the ScienceQA problems", SQA)
SQA_SPLITS = File("pid_splits.json", "the ScienceQA split lists", SQA)


def read_scienceqa(root: Path) -> list[Sample]:
    (ppath, pdata), (spath, sdata) = _json(root, SQA_PROBLEMS), _json(root, SQA_SPLITS)
    problems = _items(pdata, None, ppath, dict)
    samples = []
    for pid in _items(sdata, "test", spath):
        where = f"problem {pid}"
        if str(pid) not in problems:
            raise BenchmarkError(f"{spath}: test problem {pid} is not in {ppath.name}")
        p = problems[str(pid)]
        image = _get(p, "image", ppath, where)
        if not image:
            continue  # ScienceQA-IMG: only the questions with an image
        options = tuple(str(c) for c in _get(p, "choices", ppath, where, list))
        hint = (p.get("hint") or "").strip()
        samples.append(
            Sample(
                id=str(pid),
                image=Path(root) / "test" / str(pid) / image,
                question=_get(p, "question", ppath, where),
                answer=letters(len(options))[_get(p, "answer", ppath, where, int)],
                options=options,
                meta={"context": f"Context: {hint}" if hint else "", "subject": p.get("subject", "")},
            )
        )
    return samples


MMBENCH = File(
    "mmbench_dev_20230712.tsv",
    "the MMBench dev TSV",
    "https://github.com/open-compass/MMBench (mmbench_dev_20230712.tsv)",
)
MMBENCH_CACHE = Path(".mambavl-cache") / "mmbench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def _mmbench_image(root: Path, index: str, data: str, path: Path, where: str) -> Path:
    """The row's base64 image, decoded once into the cache under the data root (samples need a file)."""
    out = Path(root) / MMBENCH_CACHE / f"{index}.png"
    if out.exists():
        return out
    try:
        raw = base64.b64decode(data, validate=False)
        if not raw.startswith(PNG_MAGIC):
            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(raw)).save(buf, format="PNG")
            raw = buf.getvalue()
    except (binascii.Error, ValueError, OSError) as e:
        raise BenchmarkError(f"{path}: {where} field 'image' is not a base64 image ({e})") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(out)  # a run cut short leaves no half-written image behind
    return out


def read_mmbench(root: Path) -> list[Sample]:
    """Circular evaluation: a question with n options is asked n times, the options rotated by one each time
    (LLaVA's model_vqa_mmbench); a question counts only if every rotation is right."""
    path = _require(root, MMBENCH)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # images are base64 in the cells
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    samples = []
    for n, row in enumerate(rows, 2):
        where = f"row {n}"
        index = _get(row, "index", path, where).strip()
        options = [row[k].strip() for k in "ABCD" if not _missing(row.get(k))]
        answer = _get(row, "answer", path, where).strip()
        if answer not in letters(len(options)):
            raise BenchmarkError(
                f"{path}: {where} answer {answer!r} is not one of its options {letters(len(options))}"
            )
        image = _mmbench_image(root, index, _get(row, "image", path, where), path, where)
        hint = "" if _missing(row.get("hint")) else row["hint"].strip()
        for r in range(len(options)):
            rotated = tuple(options[r:] + options[:r])
            samples.append(
                Sample(
                    id=f"{index}/{r}",
                    image=image,
                    question=_get(row, "question", path, where).strip(),
                    answer=letters(len(options))[(ord(answer) - ord("A") - r) % len(options)],
                    options=rotated,
                    meta={
                        "index": index,
                        "rotation": r,
                        "context": hint,
                        "category": row.get("category", ""),
                    },
                )
            )
    return samples


SEED = File(
    "SEED-Bench.json", "the SEED-Bench questions", "https://huggingface.co/datasets/AILab-CVC/SEED-Bench"
)


def read_seed(root: Path) -> list[Sample]:
    path, data = _json(root, SEED)
    samples = []
    for i, q in enumerate(_items(data, "questions", path)):
        where = f"question {i}"
        if _get(q, "data_type", path, where) != "image":
            continue  # the image part of SEED-Bench; video questions need frames we do not take
        samples.append(
            Sample(
                id=str(_get(q, "question_id", path, where)),
                image=Path(root) / "SEED-Bench-image" / _get(q, "data_id", path, where),
                question=_get(q, "question", path, where),
                answer=_get(q, "answer", path, where, lambda v: str(v).strip().upper()),
                options=tuple(str(_get(q, f"choice_{c}", path, where)) for c in "abcd"),
                meta={"question_type_id": q.get("question_type_id", "")},
            )
        )
    return samples


def _refs_file(dataset: str) -> File:
    return File(
        f"{dataset}/refs.json",
        f"the {dataset} refs as JSON: a list of "
        "{ref_id, image_id, split, bbox: [x, y, w, h], width, height, sentences: [{sent_id, sent}]}",
        f"a JSON export of refer's data/{dataset}/refs(*).p joined with its instances.json "
        "(bbox and image width/height), https://github.com/lichengunc/refer",
    )


def read_refcoco(dataset: str, root: Path) -> list[Sample]:
    """The val split (as vlm-evaluation), one sample per sentence; the gold is the box in pixels
    (x0, y0, x1, y1) and meta carries the image size the model's normalised answer is scaled by."""
    path, data = _json(root, _refs_file(dataset))
    samples = []
    for i, ref in enumerate(_items(data, None, path)):
        where = f"ref {i}"
        if _get(ref, "split", path, where) != "val":
            continue
        x, y, w, h = _get(ref, "bbox", path, where, lambda b: [float(v) for v in b])
        size = (_get(ref, "width", path, where, int), _get(ref, "height", path, where, int))
        ref_id, image_id = _get(ref, "ref_id", path, where), _get(ref, "image_id", path, where, int)
        for j, sent in enumerate(_get(ref, "sentences", path, where, list)):
            text = sent if isinstance(sent, str) else _get(sent, "sent", path, f"{where} sentence {j}")
            sent_id = sent.get("sent_id", j) if isinstance(sent, dict) else j
            samples.append(
                Sample(
                    id=f"{ref_id}/{sent_id}",
                    image=Path(root) / "images" / f"COCO_train2014_{image_id:012d}.jpg",
                    question=text,
                    answer=(x, y, x + w, y + h),
                    meta={"image_size": size, "ref_id": ref_id},
                )
            )
    return samples


def _refcoco_score(prediction: str, s: Sample) -> dict:
    return {"accuracy": float(metrics.refcoco_accuracy(prediction, s.answer, tuple(s.meta["image_size"])))}


# --- the registry -----------------------------------------------------------------------------------------


def _paths(*files: File | str) -> tuple[str, ...]:
    return tuple(f.path if isinstance(f, File) else f for f in files)


for _benchmark in [
    Benchmark(
        "vqav2",
        "VQAv2 val (open-ended; VQA accuracy, official and prismatic normalisation)",
        _paths(VQAV2_QUESTIONS, VQAV2_ANNOTATIONS, COCO_VAL),
        read_vqav2,
        _short_answer,
        _vqa_score("prismatic"),
        _accuracy("accuracy", "accuracy_prismatic", by="answer_type"),
    ),
    Benchmark(
        "gqa",
        "GQA test-dev balanced (exact match)",
        _paths(GQA_QUESTIONS, "images"),
        read_gqa,
        _short_answer,
        lambda p, s: {"accuracy": float(metrics.gqa_accuracy(p, s.answer))},
        _accuracy(),
    ),
    Benchmark(
        "textvqa",
        "TextVQA val without OCR tokens (VQA accuracy)",
        _paths(TEXTVQA, "train_images"),
        read_textvqa,
        _short_answer,
        _vqa_score("textvqa"),
        _accuracy("accuracy", "accuracy_prismatic"),
    ),
    Benchmark(
        "textvqa-ocr",
        "TextVQA val with the Rosetta OCR tokens in the prompt, as LLaVA-1.5 asks it (VQA accuracy)",
        _paths(TEXTVQA, TEXTVQA_OCR, "train_images"),
        partial(read_textvqa, ocr=True),
        _ocr_prompt,
        _vqa_score("textvqa"),
        _accuracy("accuracy", "accuracy_prismatic"),
    ),
    Benchmark(
        "vizwiz",
        "VizWiz val (VQA accuracy; unanswerable questions included)",
        _paths(VIZWIZ, "val"),
        read_vizwiz,
        _vizwiz_prompt,
        lambda p, s: {"accuracy": float(metrics.vizwiz_accuracy(p, s.answer))},
        _accuracy(),
    ),
    *(
        Benchmark(
            f"pope-{split}",
            f"POPE COCO {split} (object hallucination; accuracy, precision, recall, F1, yes ratio)",
            _paths(_pope_file(split), COCO_VAL),
            partial(read_pope, split),
            _short_answer,  # vlm-evaluation asks POPE with its VQA prompt
            _pope_score,
            _pope_aggregate,
            max_new_tokens=8,
            choices=_yes_no_choices,
        )
        for split in ("random", "popular", "adversarial")
    ),
    Benchmark(
        "mme",
        "MME perception and cognition (yes/no; score = acc + acc+ per subtask, summed)",
        _paths(MME),
        read_mme,
        _yes_no_prompt,
        _mme_score,
        _mme_aggregate,
        max_new_tokens=8,
        choices=_yes_no_choices,
    ),
    Benchmark(
        "vsr",
        "VSR zero-shot test (is the caption true of the image)",
        _paths(VSR, "images"),
        read_vsr,
        _true_false_prompt,
        lambda p, s: {"accuracy": float(metrics.vsr_accuracy(p, s.answer))},
        _accuracy(),
        max_new_tokens=8,
        choices=lambda s: ("True", "False"),
    ),
    Benchmark(
        "ai2d",
        "AI2D test (diagram multiple choice)",
        _paths(AI2D),
        read_ai2d,
        _choice_prompt,
        _choice_score,
        _accuracy(),
        max_new_tokens=8,
        choices=_letter_choices,
    ),
    Benchmark(
        "tallyqa",
        "TallyQA test (counting, asked as 16-way multiple choice; simple and complex)",
        _paths(TALLYQA),
        read_tallyqa,
        _choice_prompt,
        _tally_score,
        _accuracy(by="split"),
        max_new_tokens=8,
        choices=_letter_choices,
    ),
    Benchmark(
        "scienceqa",
        "ScienceQA-IMG test (multiple choice, questions with an image)",
        _paths(SQA_PROBLEMS, SQA_SPLITS, "test"),
        read_scienceqa,
        _choice_prompt,
        _choice_score,
        _accuracy(by="subject"),
        max_new_tokens=8,
        choices=_letter_choices,
    ),
    Benchmark(
        "mmbench",
        "MMBench dev, circular (every rotation of the options must be answered right)",
        _paths(MMBENCH),
        read_mmbench,
        _choice_prompt,
        _choice_score,
        _mmbench_aggregate,
        max_new_tokens=8,
        choices=_letter_choices,
    ),
    Benchmark(
        "seed",
        "SEED-Bench, image questions (multiple choice)",
        _paths(SEED, "SEED-Bench-image"),
        read_seed,
        _choice_prompt,
        _choice_score,
        _accuracy(by="question_type_id"),
        max_new_tokens=8,
        choices=_letter_choices,
    ),
    *(
        Benchmark(
            dataset,
            f"{dataset} val (box from a referring expression; accuracy = IoU ≥ 0.5)",
            _paths(_refs_file(dataset), "images"),
            partial(read_refcoco, dataset),
            _refer_prompt,
            _refcoco_score,
            _accuracy(),
            max_new_tokens=48,
        )
        for dataset in ("refcoco", "refcoco+", "refcocog")
    ),
]:
    register(_benchmark)
