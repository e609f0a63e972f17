"""Prompt builders produce the seeds' strings exactly (Cobra's zephyr and In:/Out: formats)."""

import pytest

from mambavl.vlm.prompts import PromptBuilder, prompt_format_for


def test_zephyr_single_and_multi_turn():
    pb = PromptBuilder("zephyr")
    pb.add_turn("human", "<image>\nWhat is in this image?")
    assert pb.get_prompt() == "<|user|>\nWhat is in this image?<|endoftext|>\n<|assistant|>\n"
    pb.add_turn("gpt", "A cat.")
    pb.add_turn("human", "What colour?")
    assert pb.get_prompt() == (
        "<|user|>\nWhat is in this image?<|endoftext|>\n<|assistant|>\nA cat.<|endoftext|>"
        "\n<|user|>\nWhat colour?<|endoftext|>\n<|assistant|>\n"
    )


def test_potential_prompt_equals_adding_the_turn():
    pb = PromptBuilder("zephyr")
    pb.add_turn("human", "Hi")
    pb.add_turn("gpt", "")  # an empty answer is a single space, as in the seed
    assert pb.get_prompt().endswith("<|assistant|>\n <|endoftext|>")
    potential = pb.get_potential_prompt("<image> Next?")
    pb.add_turn("human", "<image> Next?")
    assert potential == pb.get_prompt()


def test_mamba_in_out_format():
    pb = PromptBuilder("mamba")
    pb.add_turn("human", "Describe.")
    pb.add_turn("gpt", "Shapes.")
    pb.add_turn("human", "More?")
    assert pb.get_prompt() == "In: Describe.\nOut: Shapes.<|endoftext|>\nIn: More?\nOut: "


def test_format_choice_follows_cobra():
    assert prompt_format_for("mamba-2.8b-zephyr") == "zephyr"
    assert prompt_format_for("mamba-2.8b-slimpj") == "mamba"


def test_turn_order_and_system_prompt_are_checked():
    pb = PromptBuilder("zephyr")
    with pytest.raises(ValueError, match="must be role 'human'"):
        pb.add_turn("gpt", "hello")
    with pytest.raises(ValueError, match="no system prompt"):
        PromptBuilder("zephyr", system_prompt="You are helpful.")
    pb.add_turn("human", "x")
    with pytest.raises(ValueError, match="the next turn is the model's"):
        pb.get_potential_prompt("y")
