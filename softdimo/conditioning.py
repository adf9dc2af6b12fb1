"""What a model is conditioned on: prompts (as word ids) or class labels, validated and turned into tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from softdimo import shapes
from softdimo.text import PromptTokenizer


class ConditionError(ValueError):
    """A prompt or class label this model cannot take."""


class ConditionerBase:
    """What every conditioner answers from its `conditioning`, `encode_prompts` and `encode_labels`: a request's
    conditioning, the text a reward reads, and both for dataset samples and Shapes prompts."""

    conditioning: str  # "text" or "class"

    def request(self, prompt: str | None, class_label: int | None) -> torch.Tensor:
        """Conditioning (1, ...) for one request, which gives exactly the one of prompt and class_label this model
        takes."""
        if self.conditioning == "text":
            if prompt is None:
                raise ConditionError("this model is text-conditional: give prompt, not class_label")
            return self.encode_prompts([prompt])
        if class_label is None:
            raise ConditionError("this model is class-conditional: give class_label, not prompt")
        return self.encode_labels([class_label])

    @staticmethod
    def reward_text(prompt: str | None, class_label: int | None) -> str:
        """The text a reward model reads for a request: its prompt, or its class's prompt ("a red circle")."""
        return prompt if prompt is not None else shapes.class_prompt(int(class_label)).text()

    def from_samples(self, prompts: Sequence[str], labels: np.ndarray) -> torch.Tensor:
        """Conditioning for dataset samples: their prompts or their labels."""
        return self.encode_prompts(prompts) if self.conditioning == "text" else self.encode_labels(labels)

    def sample_texts(self, prompts: Sequence[str], labels: np.ndarray) -> list[str]:
        """What a reward model reads for dataset samples: their prompts, or their classes' prompts."""
        return list(prompts) if self.conditioning == "text" else [self.reward_text(None, label) for label in labels]

    def for_prompt(self, prompt: shapes.Prompt) -> tuple[torch.Tensor, str]:
        """Conditioning (1, ...) and reward text for a Shapes prompt: its text, or its class for a class model."""
        if self.conditioning == "text":
            return self.encode_prompts([prompt.text()]), prompt.text()
        spec = prompt.objects[0]
        label = shapes.class_label(spec.color, spec.shape)
        return self.encode_labels([label]), self.reward_text(None, label)


@dataclass(frozen=True)
class Conditioner(ConditionerBase):
    conditioning: str
    kinds: tuple[str, ...] = shapes.KINDS  # the prompt kinds the model was trained on
    prompt_tokenizer: PromptTokenizer | None = None
    num_classes: int = 0
    grammar: str | None = "shapes"  # prompts must parse in this grammar (None: any words of the vocabulary)

    @classmethod
    def shapes_text(cls, length: int = 12) -> Conditioner:
        return cls("text", kinds=shapes.KINDS, prompt_tokenizer=PromptTokenizer(shapes.VOCABULARY, length))

    @classmethod
    def shapes_class(cls) -> Conditioner:
        return cls("class", kinds=("single",), num_classes=shapes.NUM_CLASSES)

    @classmethod
    def for_shapes(cls, conditioning: str) -> Conditioner:
        """The Shapes world's conditioner for "text" or "class" models."""
        if conditioning not in ("text", "class"):
            raise ConditionError(f"conditioning must be text or class, got {conditioning!r}")
        return cls.shapes_text() if conditioning == "text" else cls.shapes_class()

    def model_sizes(self) -> dict[str, int]:
        """The TransformerConfig fields a model conditioned this way needs."""
        if self.conditioning == "text":
            return {"text_vocab": self.prompt_tokenizer.size, "text_length": self.prompt_tokenizer.length}
        return {"num_classes": self.num_classes}

    @property
    def class_names(self) -> list[str]:
        return [shapes.class_name(i) for i in range(self.num_classes)] if self.grammar == "shapes" else []

    def prompt_pattern(self) -> str | None:
        """An anchored regular expression (ECMA-262 and Python alike) matching exactly the prompts check_prompt
        accepts; None for a class-conditional model, which takes no prompt."""
        if self.conditioning != "text":
            return None
        if self.grammar == "shapes":
            return shapes.prompt_pattern()
        word = "(?:" + "|".join(re.escape(w) for w in self.prompt_tokenizer.vocabulary) + ")"
        return f"^{word}(?: {word}){{0,{self.prompt_tokenizer.length - 1}}}$"

    def check_prompt(self, prompt: str) -> None:
        if self.grammar == "shapes":
            try:
                shapes.parse_prompt(prompt)
            except shapes.PromptError as exc:
                raise ConditionError(str(exc)) from exc
        try:
            self.prompt_tokenizer.ids(prompt)
        except ValueError as exc:
            raise ConditionError(str(exc)) from exc

    def check_label(self, label: int) -> None:
        if not 0 <= label < self.num_classes:
            raise ConditionError(f"class_label must be in 0..{self.num_classes - 1}, got {label}")

    def reward_texts(self, condition: torch.Tensor) -> list[str]:
        """What a reward reads for a batch's conditioning (B, ...): its prompts, or its classes' prompts."""
        if self.conditioning == "text":
            return self.prompt_tokenizer.decode(condition.cpu())
        return [self.reward_text(None, label) for label in condition.flatten().tolist()]

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.conditioning != "text":
            raise ConditionError("this model is class-conditional: give class_label, not prompt")
        for p in prompts:
            self.check_prompt(p)
        return self.prompt_tokenizer.encode(prompts)

    def contrasts(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What each row of a text condition (B, L) is guided away from besides the null prompt: (B, 2, L) its two
        contrast prompts (shapes.contrast_prompts) and (B,) which rows have them (a row without repeats itself);
        None when no row has any (class conditioning, another grammar, no relation prompt)."""
        if self.conditioning != "text" or self.grammar != "shapes":
            return None
        texts = self.prompt_tokenizer.decode(condition.cpu())
        found = [
            shapes.contrast_prompts(shapes.parse_prompt(text)) if text else () for text in texts
        ]  # "": the null prompt
        has = torch.tensor([bool(c) for c in found])
        if not has.any():
            return None
        pairs = [[c.text() for c in contrasts] if contrasts else [text, text] for contrasts, text in zip(found, texts)]
        others = self.prompt_tokenizer.encode([t for pair in pairs for t in pair]).view(len(texts), 2, -1)
        return others.to(condition.device), has.to(condition.device)

    def encode_labels(self, labels: Sequence[int]) -> torch.Tensor:
        if self.conditioning != "class":
            raise ConditionError("this model is text-conditional: give prompt, not class_label")
        for label in labels:
            self.check_label(int(label))
        return torch.tensor([int(x) for x in labels], dtype=torch.long)

    def to_dict(self) -> dict:
        d = {"conditioning": self.conditioning, "kinds": list(self.kinds), "grammar": self.grammar}
        if self.prompt_tokenizer is not None:
            d |= {"vocabulary": list(self.prompt_tokenizer.vocabulary), "length": self.prompt_tokenizer.length}
        if self.num_classes:
            d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Conditioner:
        tokenizer = PromptTokenizer(tuple(d["vocabulary"]), d["length"]) if "vocabulary" in d else None
        return cls(
            d["conditioning"],
            kinds=tuple(d["kinds"]),
            prompt_tokenizer=tokenizer,
            num_classes=d.get("num_classes", 0),
            grammar=d.get("grammar"),
        )
