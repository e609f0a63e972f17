"""`mambavl chat`: every answer equals `generate` on the prompt the conversation so far makes, and bad
input (paths, settings, commands) is reported while the loop goes on."""

import io

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import mambavl
from mambavl.chat import CHAT_PARAMS, ChatSession, run_chat
from mambavl.cli import app
from serving import printable_tiny_cobra

Q1, Q2 = "What is in the image?", "And then?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny-cobra whose answers are printable and differ by image, prompt and history."""
    vlm = printable_tiny_cobra()
    return vlm.save_pretrained(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def vlm(model_dir):
    return mambavl.load(model_dir)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def session(vlm, png):
    s = ChatSession(vlm, params={"max_new_tokens": 8})
    s.set_image(png)
    return s


def prompt(vlm, *turns):
    """The prompt of alternating human / gpt turns, built as a script would."""
    pb = vlm.get_prompt_builder()
    for i, text in enumerate(turns):
        pb.add_turn("human" if i % 2 == 0 else "gpt", text)
    return pb.get_prompt()


def greedy(vlm, png, *turns, **kw):
    return vlm.generate(Image.open(png), prompt(vlm, *turns), **({"max_new_tokens": 8} | kw))


def chat(session, *lines):
    """Runs the REPL over `lines` (then end of input); returns what it printed."""
    console = Console(file=io.StringIO(), width=200)
    pending = iter(lines)

    def read_line():
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    run_chat(session, console, read_line)
    return console.file.getvalue()


def answers(output):
    return [part.split("\n")[0].rstrip() for part in output.split("model> ")[1:]]


def test_cli_prints_the_greedy_answer(vlm, model_dir, png):
    args = ["chat", "--model", str(model_dir), "--image", str(png), "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, args, input=f"{Q1}\n/quit\n")
    assert result.exit_code == 0, result.output
    expected = greedy(vlm, png, Q1)
    assert expected and answers(result.output) == [expected]
    assert "you> " in result.output


def test_cli_sampling_flags_reach_the_model(vlm, model_dir, png):
    flags = ["--do-sample", "--seed", "3", "--temperature", "3", "--top-p", "0.9", "--max-new-tokens", "8"]
    args = ["chat", "--model", str(model_dir), "--image", str(png), *flags]
    result = CliRunner().invoke(app, args, input=f"{Q1}\n")
    assert result.exit_code == 0, result.output
    sampled = greedy(vlm, png, Q1, do_sample=True, seed=3, temperature=3.0, top_p=0.9)
    assert answers(result.output) == [sampled] and sampled != greedy(vlm, png, Q1)


def test_the_second_turn_sees_the_first(vlm, png, session):
    first = "".join(session.ask(Q1)).rstrip()
    assert first == greedy(vlm, png, Q1)
    second = "".join(session.ask(Q2)).rstrip()
    assert second == greedy(vlm, png, Q1, first, Q2)
    assert second != greedy(vlm, png, Q2)  # the history changed the answer
    assert session.turns == 2


def test_reset_starts_over_with_the_same_image(vlm, png, session):
    output = chat(session, Q1, Q2, "/reset", Q1)
    first, _, again = answers(output)
    assert first == again == greedy(vlm, png, Q1) and "new conversation" in output
    assert session.turns == 1 and session.image is not None


def test_a_new_image_starts_a_new_conversation(vlm, png, session, tmp_path):
    other = tmp_path / "grey.png"
    Image.new("RGB", (30, 20), (90, 90, 90)).save(other)
    output = chat(session, Q1, f"/image {other}", Q1)
    assert f"image {other} (30×20); new conversation" in output
    assert answers(output) == [greedy(vlm, png, Q1), greedy(vlm, other, Q1)]
    assert session.turns == 1


def test_bad_image_paths_are_reported_and_the_old_image_stays(vlm, png, session, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    output = chat(session, Q1, f"/image {tmp_path / 'missing.png'}", f"/image '{text}'", "/image", Q2)
    assert "error: " in output and "missing.png: no such image file" in output
    assert str(text) in output and "usage: /image PATH" in output
    first, second = answers(output)
    assert second == greedy(vlm, png, Q1, first, Q2)  # same image, same conversation
    assert session.image_path == str(png)


def test_bad_settings_are_reported_and_change_nothing(session):
    before = dict(session.params)
    output = chat(
        session,
        "/params colour=red",
        "/params temperature=-1",
        "/params max_new_tokens=4 top_p=2",  # all or nothing: max_new_tokens stays 8
        "/params top_k=many",
        "/params do_sample=maybe",
        "/params seed",
    )
    expected = [
        "unknown setting 'colour'; the settings are " + ", ".join(CHAT_PARAMS),
        "temperature=-1.0 is invalid: it must be > 0",
        "top_p=2.0 is invalid: it must be in (0, 1]",
        "top_k='many' is not an integer",
        "do_sample='maybe' is not a truth value",
        "expected key=value, got 'seed'",
    ]
    for message in expected:
        assert f"error: {message}" in output
    assert session.params == before


def test_settings_change_and_seeded_sampling_repeats(vlm, png, session):
    output = chat(session, "/params do_sample=true seed=3 temperature=3", Q1, "/reset", Q1, "/params")
    assert session.params == {**session.params, "do_sample": True, "seed": 3, "temperature": 3.0}
    sampled = greedy(vlm, png, Q1, do_sample=True, seed=3, temperature=3.0)
    assert answers(output) == [sampled, sampled] and sampled != greedy(vlm, png, Q1)
    assert "do_sample" in output and "True" in output and "temperature" in output and "3.0" in output


def test_settings_are_typed_from_sampling_params(vlm):
    s = ChatSession(vlm)
    s.set_params("do_sample=on seed=none top_k=5 repetition_penalty=1.1 max_new_tokens=16")
    assert s.params == {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 5,
        "top_p": 1.0,
        "repetition_penalty": 1.1,
        "seed": None,
    }


def test_unknown_commands_and_empty_lines(vlm, png, session):
    output = chat(session, "/frobnicate now", "", "   ", "/help", Q1)
    assert "error: unknown command '/frobnicate'" in output and output.count("/params k=v") == 2
    assert answers(output) == [greedy(vlm, png, Q1)]


def test_quit_exit_eof_and_ctrl_c_at_the_prompt_end_the_loop(session):
    assert answers(chat(session, "/exit", Q1)) == []
    assert answers(chat(session, "/quit", Q1)) == []

    def interrupted():
        raise KeyboardInterrupt

    run_chat(session, Console(file=io.StringIO()), interrupted)  # returns
    assert session.turns == 0


def test_eof_ends_the_cli_cleanly(model_dir):
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir)], input="")
    assert result.exit_code == 0, result.output
    assert "chatting with tiny-cobra, no image" in result.output


def test_ctrl_c_while_answering_drops_that_answer(vlm, png, session, monkeypatch):
    real = vlm.stream

    def stream_then_interrupt(image, prompt_text, **kw):
        monkeypatch.setattr(vlm, "stream", real)  # only the first answer is interrupted
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm, "stream", stream_then_interrupt)
    output = chat(session, Q1, Q2)
    assert "partial\n(stopped: this answer is not kept)" in output
    assert answers(output)[1] == greedy(vlm, png, Q2)  # asked as if Q1 had never been
    assert session.turns == 1


def test_a_conversation_too_long_for_the_model_is_reported(vlm, png, session):
    output = chat(session, "word " * 2500, Q1)
    assert "error: the input is" in output and "/reset starts a new conversation" in output
    assert answers(output)[1] == greedy(vlm, png, Q1)


def test_models_that_place_the_image_get_the_marker():
    vlm = mambavl.create("tiny-viper-mamba")
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    s = ChatSession(vlm, params={"max_new_tokens": 4})
    s.image = image
    got = "".join(s.ask(Q1)).rstrip()
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", f"<image>\n{Q1}")
    assert got == vlm.generate(image, pb.get_prompt(), max_new_tokens=4)
    assert "<image>" in s.conversation.get_prompt()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no/such/dir"], "neither a model directory nor a preset"),
        (["--model", "tiny-cobra"], "neither a model directory nor a preset with released weights"),
        (["--image", "missing.png"], "missing.png: no such image file"),
        (["--temperature", "0"], "temperature=0.0 is invalid"),
    ],
)
def test_cli_refuses_bad_arguments(model_dir, args, message):
    model = [] if "--model" in args else ["--model", str(model_dir)]
    result = CliRunner().invoke(app, ["chat", *model, *args], input="")
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())


def test_generate_command_prints_the_answer(vlm, model_dir, png):
    """`mambavl generate`: the greedy answer of the chat-formatted prompt, the raw prompt, the errors."""
    from mambavl.vision import load_image

    image = load_image(png)
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", Q1)
    want = vlm.generate(image, builder.get_prompt(), max_new_tokens=8)
    runner = CliRunner()
    result = runner.invoke(
        app, ["generate", Q1, "--model", str(model_dir), "--image", str(png), "--max-new-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == want
    raw = runner.invoke(app, ["generate", "abc", "--model", str(model_dir), "--raw", "--max-new-tokens", "6"])
    assert raw.output.rstrip("\n") == vlm.generate(None, "abc", max_new_tokens=6)
    sampled = [
        "generate",
        Q1,
        "--model",
        str(model_dir),
        "--temperature",
        "1.5",
        "--seed",
        "3",
        "--max-new-tokens",
        "8",
    ]
    assert runner.invoke(app, sampled).output == runner.invoke(app, sampled).output  # seeded
    missing = runner.invoke(app, ["generate", Q1, "--model", str(model_dir), "--image", "/no/such.png"])
    assert missing.exit_code == 1 and "no such image file" in missing.output


SYSTEM = "Answer in one word."


def test_a_system_prompt_is_folded_into_the_first_message(vlm, png):
    """Cobra's format has no system prompt: `--system` text goes before the first message as
    "{system}\n\n{message}", the answers those of a user who typed it there; later turns do not repeat it."""
    s = ChatSession(vlm, SYSTEM, {"max_new_tokens": 8})
    s.set_image(png)
    first = "".join(s.ask(Q1)).rstrip()
    typed = f"{SYSTEM}\n\n{Q1}"
    assert first == greedy(vlm, png, typed) and first != greedy(vlm, png, Q1)  # it reached the model
    assert "".join(s.ask(Q2)).rstrip() == greedy(vlm, png, typed, first, Q2)
    s.reset()  # a new conversation gets it again
    assert "".join(s.ask(Q1)).rstrip() == first


def test_chat_and_generate_commands_take_a_system_prompt(vlm, model_dir, png):
    typed = greedy(vlm, png, f"{SYSTEM}\n\n{Q1}")
    args = ["--model", str(model_dir), "--image", str(png), "--max-new-tokens", "8"]
    chatted = CliRunner().invoke(app, ["chat", *args, "--system", SYSTEM], input=f"{Q1}\n")
    assert chatted.exit_code == 0, chatted.output
    assert answers(chatted.output) == [typed]
    generated = CliRunner().invoke(app, ["generate", Q1, *args, "--system", SYSTEM])
    assert generated.exit_code == 0, generated.output
    assert generated.output.rstrip("\n") == typed
    empty = CliRunner().invoke(app, ["generate", Q1, *args, "--system", ""])  # nothing to fold
    assert empty.output.rstrip("\n") == greedy(vlm, png, Q1)


def test_help_says_how_the_system_prompt_is_folded():
    for command in ("chat", "generate"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "folded into the first message as '{system}\\n\\n{message}'" in " ".join(result.output.split())
