"""What a model is conditioned on: the prompts a text conditioner takes, as its pattern says and as its checks do."""

import re

import pytest

from softdimo import shapes
from softdimo.conditioning import ConditionError, Conditioner
from softdimo.text import PromptTokenizer


def _takes(conditioner: Conditioner, prompt: str) -> bool:
    try:
        conditioner.check_prompt(prompt)
    except ConditionError:
        return False
    return True


def test_a_shapes_text_model_takes_every_prompt_of_the_grammar_and_a_class_model_no_prompt():
    conditioner = Conditioner.shapes_text()
    assert conditioner.prompt_pattern() == shapes.prompt_pattern()
    # The grammar's pattern is exact for the model only if its word tokenizer reads every prompt of the grammar.
    assert all(_takes(conditioner, prompt.text()) for prompt in shapes.every_prompt())
    assert Conditioner.shapes_class().prompt_pattern() is None


@pytest.mark.parametrize(
    "prompt",
    ["red", "a red circle", "circle circle circle", "a red circle a", "", "a  red", "a red ", "blue", "a\nred"],
)
def test_a_model_without_a_grammar_takes_exactly_the_word_sequences_its_pattern_matches(prompt):
    conditioner = Conditioner("text", prompt_tokenizer=PromptTokenizer(("a", "red", "circle"), 3), grammar=None)
    assert bool(re.fullmatch(conditioner.prompt_pattern(), prompt)) == _takes(conditioner, prompt)


def test_a_request_gives_the_one_input_its_model_takes_and_the_reward_reads_the_class_as_a_prompt():
    text, classes = Conditioner.shapes_text(), Conditioner.shapes_class()
    assert text.request("a red circle", None).tolist() == text.encode_prompts(["a red circle"]).tolist()
    assert classes.request(None, 4).tolist() == [4]
    with pytest.raises(ConditionError, match="text-conditional: give prompt"):
        text.request(None, 4)
    with pytest.raises(ConditionError, match="class-conditional: give class_label"):
        classes.request("a red circle", None)
    assert Conditioner.reward_text("two blue squares", None) == "two blue squares"
    label = shapes.class_label(shapes.COLORS.index("green"), shapes.SHAPES.index("triangle"))
    assert Conditioner.reward_text(None, label) == "a green triangle"
    assert classes.sample_texts(["ignored"], [label]) == ["a green triangle"]
    prompt = shapes.parse_prompt("a green triangle")
    condition, reward_text = classes.for_prompt(prompt)
    assert (condition.tolist(), reward_text) == ([label], "a green triangle")
