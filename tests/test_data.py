"""LLaVA-format data: reading without trusting it, the seeds' tokenization and label masking, and the
pre-training check that names every bad sample."""

import io
import json
from pathlib import Path

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


# ---- hostile files: every bad record reported, the reading goes on ----------------------------------------
def hostile_dataset(tmp_path, array: bool):
    """Good samples around records that used to stop the check: deep nesting, invalid UTF-8, a lone
    surrogate, a PNG whose text chunk inflates past PIL's limit, an id that looks like terminal markup."""
    from test_hostile_files import png_with_text_bomb

    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "bomb.png").write_bytes(png_with_text_bomb(before_pixels=False))
    pieces = [
        json.dumps(GOOD).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"id": "bad-utf8", "conversations": turns(("human", "Hi"), ("gpt", "X"))})
        .encode()
        .replace(b'"X"', b'"\xff\xfe"'),
        json.dumps({"id": "surrogate", "conversations": turns(("human", "Hi"), ("gpt", "\ud800"))}).encode(),
        json.dumps({"id": "bomb", "image": "bomb.png", "conversations": GOOD["conversations"]}).encode(),
        json.dumps(
            {"id": "[/red]", "conversations": turns(("human", "x\u2028y"), ("gpt", "y" * 3000))}
        ).encode(),
        json.dumps(TEXT).encode(),
    ]
    path = tmp_path / ("data.json" if array else "data.jsonl")
    path.write_bytes(b"[" + b",\n".join(pieces) + b"]" if array else b"\n".join(pieces))
    return path, root


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json-array"])
def test_check_reports_each_hostile_record_and_goes_on(tmp_path, array):
    path, root = hostile_dataset(tmp_path, array)
    good, problems = check_file(path, root, mambavl.create("tiny-cobra", device="meta"))
    assert [s.id for s in good] == ["ok-1", "ok-text"]
    found = {p.id: str(p) for p in problems}
    nested = "record 1" if array else "line 2"
    assert set(found) == {nested, "bad-utf8", "surrogate", "bomb", "[/red]"}
    assert "nested deeper than the parser goes" in found[nested]
    assert "turn 1's text has U+DCFF at character 0, a lone surrogate" in found["bad-utf8"]
    assert "turn 1's text has U+D800" in found["surrogate"]
    assert "image bomb.png" in found["bomb"] and "Decompressed data too large" in found["bomb"]
    assert "exceed the model's 2048" in found["[/red]"]  # U+2028 inside a string is no line break


def test_an_unreadable_annotations_file_is_the_only_stop(tmp_path):
    from mambavl.data.llava import AnnotationsError

    with pytest.raises(AnnotationsError, match="cannot read the annotations file"):
        read_llava(tmp_path)  # a directory
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", ] junk')
    samples, problems = read_llava(broken)
    assert samples == [] and [p.id for p in problems] == ["record 0", str(broken)]


def test_data_check_command_reports_hostile_records_without_a_traceback(tmp_path):
    path, root = hostile_dataset(tmp_path, array=False)
    args = ["data", "check", "--annotations", str(path), "--images", str(root), "--model", "tiny-cobra"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "[/red]: " in result.output  # the id as it is, not taken for markup
    assert "surrogate: turn 1's text has U+D800" in result.output
    assert "2 usable samples, 5 with problems" in result.output


def escaping_images(tmp_path):
    """An image root, an image outside it, and records reaching that image every way a path can."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(outside)
    (root / "out.png").symlink_to(outside)
    (root / "in.png").symlink_to(root / "a.png")
    paths = {
        "dotdot": "../outside.png",
        "deep-dotdot": "sub/../../outside.png",
        "absolute": str(outside),
        "symlink-out": "out.png",
        "nul": "a.png\x00.txt",
        "symlink-in": "in.png",
        "dotdot-in": "sub/../a.png",
    }
    records = [{"id": k, "image": v, "conversations": GOOD["conversations"]} for k, v in paths.items()]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, root


def test_check_refuses_images_outside_the_image_root(tmp_path):
    path, root = escaping_images(tmp_path)
    good, problems = check_file(path, root, mambavl.create("tiny-cobra", device="meta"))
    assert [s.id for s in good] == ["symlink-in", "dotdot-in"]
    found = {p.id: p.reason for p in problems}
    assert set(found) == {"dotdot", "deep-dotdot", "absolute", "symlink-out", "nul"}
    assert "leads out of" in found["dotdot"] and "with '..'" in found["deep-dotdot"]
    assert "is an absolute path" in found["absolute"] and "through a symlink" in found["symlink-out"]
    assert "contains a NUL byte" in found["nul"]
    assert all("image paths must stay under the image root" in r for r in found.values())


def test_training_data_refuses_images_outside_the_image_root(tmp_path):
    from mambavl.data.mixture import DataError, DataSource, load_training_data

    path, root = escaping_images(tmp_path)
    vlm = mambavl.create("tiny-cobra", device="meta")
    with pytest.raises(
        DataError, match=r"5 samples cannot be used:\n.*data\.json:dotdot: image '\.\./outside"
    ):
        load_training_data([DataSource(path, root)], vlm, "finetune")
    data = load_training_data([DataSource(path, root)], vlm, "finetune", skip_bad=True)
    assert [ex.id for ex in data.examples] == ["symlink-in", "dotdot-in"]
    assert all(Path(ex.image).resolve().is_relative_to(root) for ex in data.examples)


def test_check_file_looks_for_images_beside_the_annotations_by_default(tmp_path):
    path, root = write_dataset(tmp_path)
    moved = root / "data.json"
    path.rename(moved)
    good, _ = check_file(moved, None, mambavl.create("tiny-cobra", device="meta"))
    assert [s.id for s in good] == ["ok-1", "ok-text"]


def test_data_check_exit_status_tells_bad_data_from_a_bad_set_up(tmp_path):
    """1: the data has problems; 2: the check could not run as asked (the help page says which is which)."""
    path, root = write_dataset(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", ] junk')
    runner = CliRunner()

    def status(*args):
        return runner.invoke(app, ["data", "check", *args, "--model", "tiny-cobra"], env={"COLUMNS": "200"})

    assert status("--annotations", str(path), "--images", str(root)).exit_code == 1  # samples listed
    assert status("--annotations", str(broken)).exit_code == 1  # an annotations file that does not parse
    missing = status("--annotations", str(tmp_path / "nope.json"))
    assert missing.exit_code == 2 and "no such annotation file" in missing.output
    assert status("--dataset", "llava-v15").exit_code == 2  # --data-root missing
    not_a_model = runner.invoke(
        app, ["data", "check", "--annotations", str(path), "--model", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert not_a_model.exit_code == 2, not_a_model.output
    assert not_a_model.output.startswith("error: ") and not_a_model.output.strip().count("\n") == 0
    page = " ".join(runner.invoke(app, ["data", "check", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Exit status: 0: every sample can train; 1: the data has problems" in page
    assert "2: a usage or set-up error" in page


def _train_batch():
    import torch

    from mambavl.data.collate import TrainBatch

    g = torch.Generator().manual_seed(0)
    return TrainBatch(
        ids=["a", "b"],
        input_ids=torch.randint(0, 9, (2, 5), generator=g),
        labels=torch.full((2, 5), IGNORE_INDEX),
        lengths=torch.tensor([5, 3]),
        image_rows=torch.tensor([0, 1]),
        image_at=torch.tensor([0, 0]),
        pixel_values={
            "dino": torch.randn(2, 3, 4, 4, generator=g),
            "siglip": torch.randn(2, 3, 4, 4, generator=g),
        },
    )


def test_train_batch_moves_every_tensor_and_casts_only_pixels():
    import torch

    batch = _train_batch()
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert moved.input_ids.dtype == torch.long and torch.equal(moved.input_ids, batch.input_ids)
    assert torch.equal(moved.lengths, batch.lengths) and moved.ids == batch.ids
    for k, v in moved.pixel_values.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, batch.pixel_values[k].bfloat16())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_train_batch_pins_for_the_loader_and_copies_without_waiting():
    import torch

    batch = _train_batch()
    pinned = batch.pin_memory()
    assert pinned.input_ids.is_pinned() and all(v.is_pinned() for v in pinned.pixel_values.values())
    moved = pinned.to("cuda")
    torch.cuda.synchronize()
    assert torch.equal(moved.input_ids.cpu(), batch.input_ids)
    assert torch.equal(moved.pixel_values["dino"].cpu(), batch.pixel_values["dino"])
