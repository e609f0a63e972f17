"""LLaVA-format data: reading without trusting it, the seeds' tokenization and label masking, and the
pre-training check that names every bad sample."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import mambavl
from mambavl.cli import app
from mambavl.data import check_file, dataset_paths, encode_align, encode_finetune, read_llava
from mambavl.data.llava import Sample
from mambavl.vlm.sequence import IGNORE_INDEX


def turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


GOOD = {
    "id": "ok-1",
    "image": "a.png",
    "conversations": turns(("human", "<image>\nWhat?"), ("gpt", "A cat.")),
}
TEXT = {"id": "ok-text", "conversations": turns(("human", "Hi"), ("gpt", "Hello."))}


def test_reader_reports_every_bad_record(tmp_path):
    lines = [
        json.dumps(GOOD),
        "{broken json",
        json.dumps([1, 2]),
        json.dumps({"id": "empty", "conversations": []}),
        json.dumps({"id": "order", "conversations": turns(("gpt", "x"), ("human", "y"))}),
        json.dumps({"id": "no-answer", "conversations": turns(("human", "x"))}),
        json.dumps(
            {"id": "no-marker", "image": "a.png", "conversations": turns(("human", "x"), ("gpt", "y"))}
        ),
        json.dumps({"id": "no-image", "conversations": turns(("human", "<image> x"), ("gpt", "y"))}),
        json.dumps(GOOD),
        json.dumps(TEXT),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    samples, problems = read_llava(path)
    assert [s.id for s in samples] == ["ok-1", "ok-text"]
    found = {p.id: p.reason for p in problems}
    assert "broken JSON" in found["line 2"] and "JSON object" in found["line 3"]
    assert "empty" in found["empty"] and "alternate" in found["order"] and "no answer" in found["no-answer"]
    assert "no turn has the '<image>'" in found["no-marker"] and "no image" in found["no-image"]
    assert found["ok-1"] == "duplicate id"
    array = tmp_path / "data.json"
    array.write_text(json.dumps([GOOD, TEXT]))
    assert [s.id for s in read_llava(array)[0]] == ["ok-1", "ok-text"]


def test_finetune_labels_follow_cobra():
    vlm = mambavl.create("tiny-cobra", device="meta")
    tok = vlm.tokenizer
    sample = Sample(
        "s", "a.png", (("human", "<image>\nWhat?"), ("gpt", "A cat."), ("human", "Colour?"), ("gpt", "Grey."))
    )
    enc = encode_finetune(sample, tok, vlm.get_prompt_builder())
    pieces = [
        ("<|user|>\nWhat?<|endoftext|>\n<|assistant|>\n", False),
        ("A cat.<|endoftext|>", True),
        ("\n<|user|>\nColour?<|endoftext|>\n<|assistant|>\n", False),
        ("Grey.<|endoftext|>", True),
    ]
    ids = [i for text, _ in pieces for i in tok.encode(text)]
    labels = [i if learned else IGNORE_INDEX for text, learned in pieces for i in tok.encode(text)]
    assert enc.input_ids == ids and enc.labels == labels and enc.image_at == 0


def test_align_learns_the_caption_and_its_end():
    vlm = mambavl.create("tiny-cobra", device="meta")
    sample = Sample("c", "a.png", (("human", "<image>\nDescribe."), ("gpt", " A red square. ")))
    enc = encode_align(sample, vlm.tokenizer)
    assert enc.input_ids == enc.labels == vlm.tokenizer.encode("A red square.<|endoftext|>")


def test_placeholder_models_mark_where_the_image_goes():
    vlm = mambavl.create("tiny-viper-mamba", device="meta")
    sample = Sample("v", "a.png", (("human", "<image>\nWhat?"), ("gpt", "A dog.")))
    enc = encode_finetune(sample, vlm.tokenizer, vlm.get_prompt_builder(), "placeholder")
    prompt = vlm.get_prompt_builder()
    prompt.add_turn("human", "<image>\nWhat?")
    before = prompt.get_prompt().split("<image>")[0]
    assert enc.image_at == len(vlm.tokenizer.encode(before))
    assert vlm.tokenizer.decode(enc.input_ids, skip_special_tokens=False).startswith(before)


def write_dataset(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    (root / "broken.png").write_bytes(buf.getvalue()[:200])
    records = [
        GOOD,
        TEXT,
        {"id": "missing", "image": "nope.png", "conversations": GOOD["conversations"]},
        {"id": "corrupt", "image": "broken.png", "conversations": GOOD["conversations"]},
        {"id": "long", "conversations": turns(("human", "word " * 1000), ("gpt", "ok"))},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, root


def test_check_names_missing_corrupt_and_overlong_samples(tmp_path):
    path, root = write_dataset(tmp_path)
    vlm = mambavl.create("tiny-cobra", device="meta")
    good, problems = check_file(path, root, vlm)
    assert [s.id for s in good] == ["ok-1", "ok-text"]
    found = {p.id: p.reason for p in problems}
    assert set(found) == {"missing", "corrupt", "long"}
    assert "not found" in found["missing"] and "truncated or corrupt" in found["corrupt"]
    assert "exceed the model's 2048" in found["long"]


def test_data_check_command(tmp_path):
    path, root = write_dataset(tmp_path)
    args = ["data", "check", "--annotations", str(path), "--images", str(root), "--model", "tiny-cobra"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert (
        "missing:" in result.output
        and "corrupt:" in result.output
        and "2 usable samples, 3 with problems" in result.output
    )


def test_registry_paths(tmp_path):
    ann, images = dataset_paths("llava-v15", tmp_path, "finetune")
    assert ann == tmp_path / "download/llava-v1.5-instruct/llava_v1_5_mix665k.json"
    assert images == tmp_path / "download/llava-v1.5-instruct"
    assert dataset_paths("llava-lvis4v-lrv", tmp_path, "align")[0].name == "chat.json"
    with pytest.raises(KeyError, match="unknown dataset"):
        dataset_paths("coco", tmp_path, "align")
