"""The benchmark readers on tiny copies of the official files: the samples, the prompts word for word, a
right and a wrong answer's record, hand-computed aggregates, and errors that name the file."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from eval_fixtures import WRITERS, write
from mambavl.eval.base import BENCHMARKS, SHORT_ANSWER, BenchmarkError, get_benchmark

MC = "Answer with the option's letter from the given choices directly."
TALLY_OPTIONS = "\n".join(f"{chr(ord('A') + n)}. {n}" for n in range(16))

# name -> (ids, answers, first sample's image relative to the root, first sample's prompt)
EXPECTED = {
    "vqav2": (
        ["42000", "7001"],
        [["red"] * 9 + ["maroon"], ["2"] * 10],
        "val2014/COCO_val2014_000000000042.jpg",
        f"What color is the bus?\n{SHORT_ANSWER}",
    ),
    "gqa": (
        ["201307251", "20968379"],
        ["yes", "cup"],
        "images/n15740.jpg",
        f"Is the sky blue?\n{SHORT_ANSWER}",
    ),
    "textvqa": (
        ["34602", "34603"],
        [["nokia"] * 8 + ["nokia phone"] * 2, ["23"] * 10],
        "train_images/003a8ae2ef43b901.jpg",
        f"what brand is this?\n{SHORT_ANSWER}",
    ),
    "textvqa-ocr": (
        ["34602", "34603"],
        [["nokia"] * 8 + ["nokia phone"] * 2, ["23"] * 10],
        "train_images/003a8ae2ef43b901.jpg",
        f"what brand is this?\nReference OCR token: NOKIA, menu\n{SHORT_ANSWER}",
    ),
    "vizwiz": (
        ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"],
        [["soap"] * 6 + ["unanswerable"] * 4, ["unanswerable"] * 10],
        "val/VizWiz_val_00000000.jpg",
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        f"{SHORT_ANSWER}",
    ),
    **{
        f"pope-{split}": (
            ["1", "2", "3", "4"],
            ["yes", "no", "yes", "no"],
            "val2014/COCO_val2014_000000310196.jpg",
            f"Is there a snowboard in the image?\n{SHORT_ANSWER}",
        )
        for split in ("random", "popular", "adversarial")
    },
    "mme": (
        ["count/000000006040/0", "count/000000006040/1", "artwork/10002/0", "artwork/10002/1"],
        ["Yes", "No", "Yes", "No"],
        "MME_Benchmark_release_version/count/000000006040.png",
        "Is there a train in this image? Please answer yes or no.",
    ),
    "vsr": (
        ["0", "1"],
        [True, False],
        "images/000000085637.jpg",
        'Based on the image, is this statement "True" or "False"? The cat is on the bed.\n'
        'Respond with "True" or "False" directly.',
    ),
    "ai2d": (
        ["4016.q1", "4017.q0"],
        ["B", "B"],
        "ai2d/images/4016.png",
        f"Which stage comes after the egg?\nA. adult\nB. larva\nC. pupa\nD. nymph\n{MC}",
    ),
    "tallyqa": (
        ["10", "11"],
        [3, 0],
        "VG_100K/2410.jpg",
        f"How many people are there?\n{TALLY_OPTIONS}\n{MC}",
    ),
    "scienceqa": (
        ["5", "8"],
        ["A", "B"],
        "test/5/image.png",
        "Context: Ducks live near water.\nWhich animal's feet are also adapted for swimming?\n"
        f"A. duck\nB. cat\n{MC}",
    ),
    "mmbench": (
        ["241/0", "241/1", "241/2", "241/3", "1032/0", "1032/1"],
        ["C", "B", "A", "D", "A", "B"],
        ".mambavl-cache/mmbench/241.png",
        f"Look at the sky.\nWhat is the main color?\nA. red\nB. green\nC. blue\nD. yellow\n{MC}",
    ),
    "seed": (
        ["101669", "101670"],
        ["A", "D"],
        "SEED-Bench-image/1454426_2591111986",
        f"How many towels are in the image?\nA. one\nB. two\nC. three\nD. four\n{MC}",
    ),
    **{
        name: (
            ["0/0", "0/1"],
            [(10.0, 20.0, 40.0, 60.0)] * 2,
            "images/COCO_train2014_000000581857.jpg",
            "Please provide the bounding box coordinate of the region this sentence describes: "
            '"the lady with the blue shirt"',
        )
        for name in ("refcoco", "refcoco+", "refcocog")
    },
}

# name -> (a right prediction for the first sample, a wrong one)
PREDICTIONS = {
    "vqav2": ("red", "blue"),
    "gqa": ("yes", "no"),
    "textvqa": ("nokia", "samsung"),
    "textvqa-ocr": ("Nokia", "menu"),
    "vizwiz": ("soap", "bottle"),
    "pope-random": ("Yes", "No"),
    "pope-popular": ("yes, there is", "No"),
    "pope-adversarial": ("Yes", "There is not."),
    "mme": ("Yes", "No"),
    "vsr": ("True", "False"),
    "ai2d": ("B", "A"),
    "tallyqa": ("D", "A"),
    "scienceqa": ("A", "B"),
    "mmbench": ("C", "A"),
    "seed": ("A", "B"),
    "refcoco": ("[0.1, 0.25, 0.4, 0.75]", "[0.5, 0.5, 0.9, 0.9]"),
    "refcoco+": ("[10, 20, 40, 60]", "[0.5, 0.5, 0.9, 0.9]"),
    "refcocog": ("[0.1, 0.25, 0.4, 0.75]", "no idea"),
}
VQA_STYLE = {"vqav2", "textvqa", "textvqa-ocr"}


def test_every_benchmark_has_a_fixture():
    get_benchmark("vqav2")  # fills the registry
    assert set(EXPECTED) == set(WRITERS) == set(PREDICTIONS) == set(BENCHMARKS) - {"shapes"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    return {name: write(name, base / name) for name in WRITERS}


def records(name, samples, predictions):
    b = get_benchmark(name)
    return [
        b.score(p, s) | {"id": s.id, "prediction": p, "meta": s.meta}
        for s, p in zip(samples, predictions, strict=True)
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_the_official_files(name, roots):
    b, root = get_benchmark(name), roots[name]
    samples = b.read(root)
    ids, answers, image, prompt = EXPECTED[name]
    assert [s.id for s in samples] == ids
    assert [s.answer for s in samples] == answers
    assert samples[0].image == root / image
    assert b.prompt(samples[0]) == prompt
    if b.choices is not None:
        assert all(b.choices(s) for s in samples)


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_scores_a_right_and_a_wrong_answer(name, roots):
    b = get_benchmark(name)
    sample = b.read(roots[name])[0]
    right, wrong = PREDICTIONS[name]
    keys = {"accuracy", "accuracy_prismatic"} if name in VQA_STYLE else {"accuracy"}
    assert b.score(right, sample) == dict.fromkeys(keys, 1.0)
    assert b.score(wrong, sample) == dict.fromkeys(keys, 0.0)


def test_vqav2_aggregate_by_hand(roots):
    b = get_benchmark("vqav2")
    samples = b.read(roots["vqav2"])
    # "maroon" is 1 of 10 answers: 9 of the 10 leave-one-out subsets hold it once (1/3), one not at all
    assert b.score("maroon", samples[0])["accuracy"] == pytest.approx(0.3)
    metrics = b.aggregate(records("vqav2", samples, ["maroon", "2"]))
    assert metrics["accuracy"] == pytest.approx(0.65)
    assert metrics["accuracy_by_answer_type"] == {"number": 1.0, "other": pytest.approx(0.3)}
    assert metrics["questions"] == 2


def test_textvqa_ocr_prompt_without_tokens(roots):
    b = get_benchmark("textvqa-ocr")
    assert b.prompt(b.read(roots["textvqa-ocr"])[1]) == f"what number is on the shirt?\n{SHORT_ANSWER}"


def test_pope_aggregate_by_hand(roots):
    b = get_benchmark("pope-random")
    samples = b.read(roots["pope-random"])  # labels yes, no, yes, no
    metrics = b.aggregate(records("pope-random", samples, ["Yes", "No", "Yes", "Yes"]))
    # tp 2, fp 1, tn 1, fn 0
    assert metrics["accuracy"] == 0.75
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == 1.0
    assert metrics["f1"] == pytest.approx(0.8)
    assert metrics["yes_ratio"] == 0.75
    assert b.choices(samples[0]) == ("Yes", "No")


def test_mme_aggregate_by_hand(roots):
    b = get_benchmark("mme")
    samples = b.read(roots["mme"])
    assert samples[2].image == roots["mme"] / "MME_Benchmark_release_version/artwork/images/10002.jpg"
    # count: both right (acc 1, acc+ 1 -> 200); artwork: one of two right (acc 0.5, acc+ 0 -> 50)
    metrics = b.aggregate(records("mme", samples, ["Yes", "No", "Yes", "Yes"]))
    assert metrics["subtasks"]["count"]["score"] == pytest.approx(200)
    assert metrics["subtasks"]["artwork"]["score"] == pytest.approx(50)
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == pytest.approx((250, 0, 250))


def test_mme_reads_the_release_folder_itself(roots):
    b = get_benchmark("mme")
    assert b.read(roots["mme"] / "MME_Benchmark_release_version") == b.read(roots["mme"])


def test_tallyqa_letters_stand_for_counts(roots):
    b = get_benchmark("tallyqa")
    samples = b.read(roots["tallyqa"])
    assert b.score("3", samples[0]) == {"accuracy": 1.0}  # the count itself
    assert b.choices(samples[0]) == tuple("ABCDEFGHIJKLMNOP")
    metrics = b.aggregate(records("tallyqa", samples, ["D", "B"]))  # 3 right; 1 for 0 wrong
    assert metrics["accuracy"] == 0.5
    assert metrics["accuracy_by_split"] == {"complex": 0.0, "simple": 1.0}


def test_scienceqa_takes_test_questions_with_an_image(roots):
    b = get_benchmark("scienceqa")
    second = b.read(roots["scienceqa"])[1]
    assert (
        b.prompt(second)
        == f"Which is a compound sentence?\nA. I ran.\nB. I ran, and she walked.\nC. Run!\n{MC}"
    )
    assert b.choices(second) == ("A", "B", "C")


def test_mmbench_is_circular(roots):
    b = get_benchmark("mmbench")
    samples = b.read(roots["mmbench"])
    assert [s.options for s in samples[:2]] == [
        ("red", "green", "blue", "yellow"),
        ("green", "blue", "yellow", "red"),
    ]
    assert b.prompt(samples[4]) == f"Is it day or night?\nA. day\nB. night\n{MC}"
    for s in (samples[0], samples[4]):
        with Image.open(s.image) as im:
            assert im.format == "PNG"
    # the cache is written once: reading again leaves the files as they are
    mtime = samples[0].image.stat().st_mtime_ns
    assert b.read(roots["mmbench"]) == samples and samples[0].image.stat().st_mtime_ns == mtime
    # 241 right in every rotation; 1032 right only as first shown -> circular 1/2, vanilla 2/2
    predictions = ["C", "B", "A", "D", "A", "A"]
    metrics = b.aggregate(records("mmbench", samples, predictions)[::-1])  # any order of records
    assert metrics["circular_accuracy"] == 0.5
    assert metrics["vanilla_accuracy"] == 1.0
    assert (metrics["questions"], metrics["rotations"]) == (2, 6)


def test_seed_takes_image_questions_only(roots):
    b = get_benchmark("seed")
    assert [s.options for s in b.read(roots["seed"])] == [("one", "two", "three", "four")] * 2


def test_refcoco_reads_val_refs_with_their_image_size(roots):
    b = get_benchmark("refcoco")
    samples = b.read(roots["refcoco"])
    assert [s.meta["image_size"] for s in samples] == [(100, 80)] * 2
    assert b.prompt(samples[1]).endswith('describes: "lady"')
    assert b.max_new_tokens > get_benchmark("vqav2").max_new_tokens
    assert b.aggregate(records("refcoco", samples, ["[0.1, 0.25, 0.4, 0.75]", "none"]))["accuracy"] == 0.5


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_missing_file_names_it_and_its_source(name, tmp_path):
    b = get_benchmark(name)
    with pytest.raises(BenchmarkError, match=re.escape(b.files[0])) as e:
        b.read(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "expected" in str(e.value)


def test_textvqa_ocr_needs_the_ocr_file(tmp_path):
    root = write("textvqa-ocr", tmp_path)
    (root / "TextVQA_Rosetta_OCR_v0.2_val.json").unlink()
    assert get_benchmark("textvqa").read(root)
    with pytest.raises(BenchmarkError, match=r"TextVQA_Rosetta_OCR_v0\.2_val\.json: not found.*textvqa\.org"):
        get_benchmark("textvqa-ocr").read(root)


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_lines(path, edit):
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


def _drop(key):
    return lambda record: record.pop(key)


# name -> (file, how it is broken, what the error must say besides the file name)
MALFORMED = {
    "vqav2": (
        "v2_mscoco_val2014_annotations.json",
        lambda p: edit_json(p, lambda d: d["annotations"][1].pop("answers")),
        "annotation 1 has no field 'answers'",
    ),
    "gqa": ("testdev_balanced_questions.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    "textvqa": (
        "TextVQA_0.5.1_val.json",
        lambda p: edit_json(p, lambda d: d["data"][0].pop("question")),
        "record 0 has no field 'question'",
    ),
    "vizwiz": ("Annotations/val.json", lambda p: p.write_text('{"a": 1}'), "expected a JSON list"),
    "pope-random": (
        "coco_pope_random.json",
        lambda p: edit_lines(
            p, lambda ls: ls.__setitem__(1, json.dumps({"question_id": 2, "image": "x.jpg", "label": "no"}))
        ),
        "line 2 has no field 'text'",
    ),
    "pope-adversarial": (
        "coco_pope_adversarial.json",
        lambda p: edit_lines(p, lambda ls: ls.__setitem__(2, "{oops")),
        "line 3 is not valid JSON",
    ),
    "mme": (
        "MME_Benchmark_release_version/count/000000006040.txt",
        lambda p: p.write_text("Is there a train?\n"),
        "line 1 is 'Is there a train?', expected 'question<TAB>Yes|No'",
    ),
    "vsr": (
        "zeroshot/test.jsonl",
        lambda p: edit_lines(p, lambda ls: ls.__setitem__(1, json.dumps({"image": "a.jpg", "caption": "c"}))),
        "line 2 has no field 'label'",
    ),
    "ai2d": (
        "ai2d/test.jsonl",
        lambda p: edit_lines(p, lambda ls: ls.__setitem__(0, ls[0].replace('"answer": 1', '"answer": 7'))),
        "line 1 answer 7 is not an index into its 4 options",
    ),
    "tallyqa": (
        "test.json",
        lambda p: edit_json(p, lambda d: d[1].pop("issimple")),
        "record 1 has no field 'issimple'",
    ),
    "scienceqa": (
        "pid_splits.json",
        lambda p: edit_json(p, lambda d: d["test"].append("77")),
        "test problem 77 is not in problems.json",
    ),
    "mmbench": (
        "mmbench_dev_20230712.tsv",
        lambda p: p.write_text(p.read_text().replace("\tA\tscene", "\tE\tscene")),
        "row 3 answer 'E' is not one of its options",
    ),
    "seed": (
        "SEED-Bench.json",
        lambda p: edit_json(p, lambda d: d["questions"][2].pop("choice_c")),
        "question 2 has no field 'choice_c'",
    ),
    "refcocog": (
        "refcocog/refs.json",
        lambda p: edit_json(p, lambda d: d[0].pop("width")),
        "ref 0 has no field 'width'",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_record_names_the_file_and_the_field(name, tmp_path):
    root = write(name, tmp_path)
    relative, breaks, says = MALFORMED[name]
    breaks(root / relative)
    with pytest.raises(BenchmarkError, match=re.escape(str(root / relative))) as e:
        get_benchmark(name).read(root)
    assert says in str(e.value)


def test_mmbench_bad_image_names_the_row(tmp_path):
    root = write("mmbench", tmp_path)
    tsv = root / "mmbench_dev_20230712.tsv"
    lines = tsv.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[9] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
    lines[1] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError, match=r"mmbench_dev_20230712\.tsv: row 2 field 'image'"):
        get_benchmark("mmbench").read(root)
