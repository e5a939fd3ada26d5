"""Marco-o1's chat format and answer handling."""

import pytest

from search.prompts import answers_match, build_prompt, extract_answer, split_response


@pytest.mark.parametrize("response, answer", [
    ("<Thought>\n2+2\n</Thought>\n<Output>\n4\n</Output>", "4"),
    ("<Output>first</Output> then <Output> last </Output>", "last"),
    ("<Thought>x</Thought><Output>unclosed 17", "unclosed 17"),
    ("no tags at all: 12", None),
    ("<Output>   </Output>", None),
    ("<Thought>never finished", None),
    ("", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_answers_match_normalises_numbers_and_text():
    assert answers_match("The answer is 1,200.", "1200")
    assert answers_match("3.0", "3")
    assert answers_match("  Paris ", "paris")
    assert not answers_match("41", "42")
    assert not answers_match(None, "42")


def test_prompt_is_chatml_with_the_system_prompt():
    text = build_prompt("What is 2+2?", system_prompt="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "<Thought>" in build_prompt("q")  # the default system prompt asks for Thought/Output


def test_chat_prompt_matches_the_single_question_prompt_and_takes_a_system_message():
    from search.prompts import build_chat_prompt
    assert build_chat_prompt([("user", "q")]) == build_prompt("q")
    assert build_chat_prompt([("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


def test_split_response():
    assert split_response("<Thought>\na\n</Thought>\n<Output>\n5\n</Output>") == ("a", "5")
