"""Shared fixtures: tiny models with fixed seeds, so tests are exact and fast."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_bundles import TINY_TOKENIZER, tiny_transformer_config  # noqa: E402

from softdimo.conditioning import Conditioner  # noqa: E402
from softdimo.transformer import MaskedTransformer  # noqa: E402
from softdimo.vq import VQTokenizer  # noqa: E402


@pytest.fixture
def tiny_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(TINY_TOKENIZER).eval()


@pytest.fixture
def text_conditioner() -> Conditioner:
    return Conditioner.shapes_text()


@pytest.fixture
def tiny_text_transformer(text_conditioner) -> MaskedTransformer:
    torch.manual_seed(0)
    return MaskedTransformer(tiny_transformer_config(text_conditioner)).eval()
