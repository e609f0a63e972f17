"""Prompt builders produce the seeds' strings exactly (Cobra's zephyr and In:/Out: formats), and put system
text in the format's system slot or, where there is none, fold it into the user's message."""

import pytest

import mambavl
from mambavl.vlm.prompts import (
    CHATML_TEMPLATE,
    ChatTemplateBuilder,
    PromptBuilder,
    PromptFormat,
    prompt_format_for,
)


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


def test_turn_order_is_checked():
    pb = PromptBuilder("zephyr")
    with pytest.raises(ValueError, match="must be role 'human'"):
        pb.add_turn("gpt", "hello")
    pb.add_turn("human", "x")
    with pytest.raises(ValueError, match="the next turn is the model's"):
        pb.get_potential_prompt("y")


# ---- system text: a slot where the format has one, else folded into the user's message -----------------
SYSTEM = "  Answer in one word. "  # blanks around it, as clients send them: stripped like any message


@pytest.mark.parametrize("fmt", ["zephyr", "mamba"])
def test_system_text_is_folded_where_the_format_has_no_slot(fmt):
    """Cobra (zephyr, trained with an empty system prompt), ML-Mamba and In:/Out: have no system slot: the
    system text goes before the first user message as "{system}\n\n{message}", as if typed there."""
    folded = PromptBuilder(fmt, SYSTEM)
    assert not folded.system_slot
    folded.add_turn("human", "<image>\nWhat is it?")
    folded.add_turn("gpt", "A cat.")
    folded.add_turn("human", "Colour?")
    typed = PromptBuilder(fmt)
    typed.add_turn("human", "Answer in one word.\n\nWhat is it?")
    typed.add_turn("gpt", "A cat.")
    typed.add_turn("human", "Colour?")  # only the first message carries it
    assert folded.get_prompt() == typed.get_prompt()
    if fmt == "zephyr":
        assert folded.get_prompt().startswith("<|user|>\nAnswer in one word.\n\nWhat is it?<|endoftext|>")


def test_empty_system_text_leaves_the_seeds_prompt_unchanged():
    for system in (None, "", "  \n"):
        pb = PromptBuilder("zephyr", system)
        pb.add_turn("human", "Hi")
        assert pb.get_prompt() == "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"


def test_the_potential_prompt_carries_the_folded_system_text():
    pb = PromptBuilder("zephyr", "Be brief.")
    potential = pb.get_potential_prompt("Hi")
    assert potential == "<|user|>\nBe brief.\n\nHi<|endoftext|>\n<|assistant|>\n"
    pb.add_turn("human", "Hi")
    assert pb.get_prompt() == potential
    pb.add_turn("gpt", "Ok.")
    assert (
        pb.get_potential_prompt("More")
        == potential + "Ok.<|endoftext|>\n<|user|>\nMore<|endoftext|>\n<|assistant|>\n"
    )


def test_a_system_message_later_in_the_conversation_folds_into_the_next_user_turn():
    pb = PromptBuilder("zephyr")
    pb.add_turn("human", "Hi")
    pb.add_system("Now answer in French.")  # between the user's turn and the answer: waits for the next one
    pb.add_turn("gpt", "Hello.")
    pb.add_system("  ")  # blank: nothing
    pb.add_system("Be brief.")
    pb.add_turn("human", "<image> Bye")
    assert pb.get_prompt() == (
        "<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello.<|endoftext|>"
        "\n<|user|>\nNow answer in French.\n\nBe brief.\n\nBye<|endoftext|>\n<|assistant|>\n"
    )


def test_a_format_with_a_system_slot_keeps_it_there():
    slotted = PromptFormat(human="U: {msg}\nA: ", eos="</s>", allow_system_prompt=True)
    pb = PromptBuilder(slotted, "S. ")
    assert pb.system_slot
    pb.add_turn("human", "Hi")
    assert pb.get_prompt() == "S. U: Hi\nA: "


def test_chat_templates_use_their_system_slot_and_fold_later_system_text():
    pb = ChatTemplateBuilder(CHATML_TEMPLATE, "Be brief. ")
    assert pb.system_slot
    pb.add_turn("human", "<image>\nWhat?")
    pb.add_turn("gpt", "A dog.")
    pb.add_system("Answer in French.")
    potential = pb.get_potential_prompt("Colour?")
    pb.add_turn("human", "Colour?")
    assert pb.get_prompt() == potential
    assert pb.get_prompt() == (
        "<|im_start|>system\nBe brief. <|im_end|>\n<|im_start|>user\n<image>\nWhat?<|im_end|>\n"
        "<|im_start|>assistant\nA dog.<|im_end|>\n<|im_start|>user\nAnswer in French.\n\nColour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_get_prompt_builder_folds_for_cobra_and_uses_the_slot_for_viper():
    cobra = mambavl.create("tiny-cobra").get_prompt_builder("Be brief.")
    cobra.add_turn("human", "Hi")
    assert cobra.get_prompt() == "<|user|>\nBe brief.\n\nHi<|endoftext|>\n<|assistant|>\n"
    viper = mambavl.create("tiny-viper-mamba")
    default = viper.get_prompt_builder()
    default.add_turn("human", "Hi")
    assert "You are a helpful language and vision assistant." in default.get_prompt()
    own = viper.get_prompt_builder("Be brief.")
    own.add_turn("human", "Hi")
    assert own.get_prompt() == default.get_prompt().replace(
        "You are a helpful language and vision assistant. ", "Be brief."
    )
