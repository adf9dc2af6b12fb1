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
    "prompt", ["red", "a red circle", "circle circle circle", "a red circle a", "", "a  red", "a red ", "blue", "a\nred"]
)
def test_a_model_without_a_grammar_takes_exactly_the_word_sequences_its_pattern_matches(prompt):
    conditioner = Conditioner("text", prompt_tokenizer=PromptTokenizer(("a", "red", "circle"), 3), grammar=None)
    assert bool(re.fullmatch(conditioner.prompt_pattern(), prompt)) == _takes(conditioner, prompt)
