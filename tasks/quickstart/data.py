"""Concept sets drawn from the word lists of ``tasks.concepts``, with held-out validation sets."""

from __future__ import annotations

import json
import random
from typing import Optional

from lightning_ipa.data import PromptDataModule, check_sizes, text_lines
from tasks.concepts import concept_sets

SHAPES = '{"concepts": [words]}, [words] or space-separated words'


def read_concepts(path: str) -> list[list[str]]:
    """Concept lists from a UTF-8 file, one per line: JSON ``{"concepts": [...]}``, a JSON list of words, or plain
    space-separated words.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a byte that is not UTF-8 (file:line:column), or a line of another shape (file:line).
    """
    lists = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            concepts = json.loads(line) if line.lstrip().startswith(("{", "[", '"')) else line.split()
            concepts = concepts["concepts"] if isinstance(concepts, dict) else concepts
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}:{number}: expected {SHAPES} ({error!r})") from None
        if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise ValueError(f"{path}:{number}: concepts must be a non-empty list of words, got {concepts!r}; expected {SHAPES}")
        lists.append(concepts)
    return lists


class ConceptsDataModule(PromptDataModule):
    """Prompts asking for one sentence that uses all given words; meta carries the words."""

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        concepts_per_prompt: int = 3,
        train_size: int = 5000,
        val_size: int = 64,
        seed: int = 0,
        template: str = "Write one sentence that uses all of these words: {concepts}.",
        predict_file: Optional[str] = None,
    ):
        """
        Args:
            batch_size: Prompts per RL step and device.
            eval_batch_size: Prompts per validation/test/predict batch.
            num_workers: DataLoader worker processes.
            concepts_per_prompt: Words per concept set.
            train_size: Training concept sets.
            val_size: Held-out concept sets (never trained on), used by validate and test.
            seed: Seed of the concept-set draw.
            template: Prompt text; ``{concepts}`` becomes the comma-separated words.
            predict_file: Concept lists for ``predict``, one per line of a UTF-8 file (JSON ``{"concepts": [...]}``, a JSON list
                of words, or space-separated words); None: the validation sets. An empty file is an error.

        Raises:
            ValueError: a negative size, or a template without ``{concepts}``.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        check_sizes(train_size=train_size, val_size=val_size)
        if "{concepts}" not in template:
            raise ValueError(f"template must contain '{{concepts}}', got {template!r}")

    def item(self, concepts: list[str]) -> dict:
        return {"prompt": self.hparams.template.format(concepts=", ".join(concepts)), "meta": {"concepts": list(concepts)}}

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        sets = concept_sets(hp.train_size + hp.val_size, hp.concepts_per_prompt, random.Random(hp.seed))
        random.Random(hp.seed).shuffle(sets)
        self.splits = {"val": [self.item(s) for s in sets[: hp.val_size]], "train": [self.item(s) for s in sets[hp.val_size :]]}
        if hp.predict_file:
            self.splits["predict"] = [self.item(c) for c in read_concepts(hp.predict_file)]
