"""The lmms-eval adapter (`mambavl.eval.lmms`) end to end: `lmms-eval --model mambavl` found through the
entry point, on two local tasks over the demo model's held-out questions (a generate_until task scored by
exact match, a multiple_choice task scored by log-likelihood), offline, with every answer and score
checked against mambavl computing the same thing directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import mambavl
from mambavl.eval.lmms import sampling_kwargs  # lmms-eval is a test dependency (the `test` extra)

# The lmms-eval CLI itself (its console script's `main`), in a process where connecting anywhere fails
# loudly: the run must need no network.
CLI = textwrap.dedent(
    """
    import socket, sys

    def refuse(what):
        sys.stderr.write(f"NETWORK ACCESS ATTEMPTED: {what}\\n")
        raise OSError(f"no network in this test ({what})")

    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo
    socket.socket.connect = lambda s, a: refuse(a) if s.family != socket.AF_UNIX else connect(s, a)
    socket.getaddrinfo = lambda host, *a, **k: refuse(host)
    from lmms_eval.cli.dispatch import main
    sys.argv[0] = "lmms-eval"
    main()
    """
)

UTILS = """
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]

def doc_to_choice(doc):
    return doc["choices"]
"""

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
"""
GENERATE = """task: mambavl_shapes_generate
output_type: generate_until
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE = """task: mambavl_shapes_choice
output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def prompt(vlm, question: str) -> str:
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", question)
    return builder.get_prompt()


def first_image(doc: dict):
    return Image.open(doc["images"][0]).convert("RGB") if doc["images"] else None


@torch.inference_mode()
def logprob(vlm, image, prompt_text: str, continuation: str) -> float:
    """log P(continuation | image, prompt) the slow way: prefill the prompt, then one decoding step per
    continuation token (the recurrent path `generate` takes, not the adapter's single forward pass)."""
    tok = vlm.tokenizer
    context, whole = tok.encode(prompt_text), tok.encode(prompt_text + continuation)
    assert whole[: len(context)] == context  # the demo's byte tokenizer never merges across the boundary
    batch, _ = vlm.prepare([image], [prompt_text])
    state = vlm.lm.new_state(1)
    hidden = vlm.prefill(batch.embeds, batch.lengths, state)
    total = 0.0
    for token in whole[len(context) :]:
        logits = vlm.lm.lm_head(hidden)[0, : tok.vocab_size].float()
        total += float(logits.log_softmax(-1)[token])
        hidden = vlm.lm(torch.tensor([[token]]), state=state, return_hidden=True)[:, -1]
    return total


def held_out_docs(data: Path, n: int) -> list[dict]:
    """n held-out questions with their image paths and their question type's answers as the choices; one
    without its image (text only) and one with a second image (the adapter uses the first)."""
    rows = json.loads((data / "heldout.json").read_text())
    choices: dict[str, set] = {}
    for r in rows:
        choices.setdefault(r["types"][0], set()).add(r["conversations"][1]["value"])
    docs = [
        {
            "images": [str(data / "images" / r["image"])],
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": r["conversations"][1]["value"],
            "choices": sorted(choices[r["types"][0]]),
        }
        for r in rows[:n]
    ]
    docs[1]["images"] = []
    docs[2]["images"].append(str(data / "images" / rows[-1]["image"]))
    return docs


def write_task(folder: Path, docs: list[dict], yaml: str) -> None:
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "utils.py").write_text(UTILS)
    (folder / "task.yaml").write_text(yaml + COMMON.format(docs=folder / "docs.jsonl"))


def read_samples(out: Path, task: str) -> list[dict]:
    (path,) = out.glob(f"*/*_samples_{task}.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lmms_eval_cli_runs_mambavl_offline_and_agrees_with_direct_computation(
    demo_model_dir, tmp_path, monkeypatch
):
    vlm = mambavl.load(demo_model_dir)
    docs = held_out_docs(demo_model_dir.parent / "data", 10)
    greedy = [
        vlm.generate(first_image(d), prompt(vlm, d["question"]), max_new_tokens=8, stop=("\n",)) for d in docs
    ]
    # The short demo run answers most questions wrongly; half the targets are its own greedy answers, so
    # that exact_match is well away from 0 and drops if lmms-eval's answers differ from these.
    generate_docs = [
        d | {"answer": g} if i % 2 else d for i, (d, g) in enumerate(zip(docs, greedy, strict=True))
    ]
    write_task(tmp_path / "tasks" / "generate", generate_docs, GENERATE)
    write_task(tmp_path / "tasks" / "choice", docs, CHOICE)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "out"
    args = [
        *("--model", "mambavl", "--model_args", f"pretrained={demo_model_dir},device=cpu,dtype=float32"),
        *("--tasks", "mambavl_shapes_generate,mambavl_shapes_choice", "--batch_size", "4"),
        *("--include_path", str(tmp_path / "tasks"), "--output_path", str(out), "--log_samples"),
    ]
    run = subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300, env=os.environ
    )
    log = run.stdout + run.stderr
    assert "'mambavl' not found" not in log, (
        "reinstall mambavl (pip install -e .): its entry point is missing"
    )
    assert run.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    assert "NETWORK ACCESS ATTEMPTED" not in log, log[-4000:]
    assert "documents have 2 visuals" in log  # the warning for the doc with two images
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())["results"]

    # generate_until: lmms-eval's answers (batched by 4) are our greedy answers, one by one
    answers = [s["filtered_resps"] for s in read_samples(out, "mambavl_shapes_generate")]
    assert answers == greedy
    expected = sum(g == d["answer"] for g, d in zip(greedy, generate_docs, strict=True)) / len(docs)
    assert expected >= 0.5
    assert results["mambavl_shapes_generate"]["exact_match,none"] == pytest.approx(expected)

    # multiple_choice: each option's score is its negative log-probability, as lmms-eval's scorer (argmin)
    # expects; acc is the share of questions whose most probable option is the answer
    correct = 0
    for doc, sample in zip(docs, read_samples(out, "mambavl_shapes_choice"), strict=True):
        direct = [logprob(vlm, first_image(doc), prompt(vlm, doc["question"]), c) for c in doc["choices"]]
        scores = [float(score) for score, _ in sample["filtered_resps"]]
        assert scores == pytest.approx([-d for d in direct], rel=1e-4, abs=1e-4)
        correct += doc["choices"][max(range(len(direct)), key=direct.__getitem__)] == doc["answer"]
    assert results["mambavl_shapes_choice"]["acc,none"] == pytest.approx(correct / len(docs))


def test_gen_kwargs_map_to_mambavl_sampling():
    greedy, unused = sampling_kwargs({"max_new_tokens": 8, "temperature": 0, "until": ["\n\n"], "top_p": 0.9})
    assert greedy == {"max_new_tokens": 8, "stop": ("\n\n",)} and unused == []
    sampled, _ = sampling_kwargs({"temperature": 0.7, "top_p": 0.9, "until": "###"})
    assert sampled == {
        "max_new_tokens": 1024,
        "stop": ("###",),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert sampling_kwargs({"do_sample": True})[0]["temperature"] == 1.0
    assert "do_sample" not in sampling_kwargs({"do_sample": False, "temperature": 0.7})[0]
    assert sampling_kwargs({"image_aspect_ratio": "pad", "num_beams": 1})[1] == ["image_aspect_ratio"]
    with pytest.raises(ValueError, match="num_beams=1"):
        sampling_kwargs({"num_beams": 4})
