"""Shared fixtures: tiny models with fixed seeds, so tests are exact and fast."""

import pytest
import torch

from softdimo.conditioning import Conditioner
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.vq import TokenizerConfig, VQTokenizer

TINY_TOKENIZER = TokenizerConfig(levels=(4, 4, 4), channels=(16, 32), blocks=1)


@pytest.fixture
def tiny_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(TINY_TOKENIZER).eval()


def tiny_transformer_config(conditioner: Conditioner, codebook_size: int = 64) -> TransformerConfig:
    sizes = (
        {"text_vocab": conditioner.prompt_tokenizer.size, "text_length": conditioner.prompt_tokenizer.length}
        if conditioner.conditioning == "text"
        else {"num_classes": conditioner.num_classes}
    )
    return TransformerConfig(codebook_size=codebook_size, tokens=64, width=32, depth=2, heads=4, **sizes)


@pytest.fixture
def text_conditioner() -> Conditioner:
    return Conditioner.shapes_text()


@pytest.fixture
def tiny_text_transformer(text_conditioner) -> MaskedTransformer:
    torch.manual_seed(0)
    return MaskedTransformer(tiny_transformer_config(text_conditioner)).eval()
