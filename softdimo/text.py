"""Prompt -> conditioning tokens: a closed word vocabulary, id 0 reserved for padding and the null prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class VocabularyError(ValueError):
    """A prompt with a word the model was not trained on, or too many words."""


@dataclass(frozen=True)
class PromptTokenizer:
    vocabulary: tuple[str, ...]
    length: int  # prompts are padded (with id 0) or refused beyond this many words

    @property
    def size(self) -> int:
        return len(self.vocabulary) + 1  # + padding

    def ids(self, prompt: str) -> list[int]:
        words = prompt.split(" ")
        if len(words) > self.length:
            raise VocabularyError(f"prompt has {len(words)} words; this model reads at most {self.length}")
        index = {w: i + 1 for i, w in enumerate(self.vocabulary)}
        unknown = [w for w in words if w not in index]
        if unknown:
            raise VocabularyError(f"unknown words {unknown}; the vocabulary is: {' '.join(self.vocabulary)}")
        return [index[w] for w in words] + [0] * (self.length - len(words))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, length) word ids."""
        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, length) word ids -> prompts (padding dropped)."""
        return [" ".join(self.vocabulary[i - 1] for i in row if i) for row in ids.tolist()]
