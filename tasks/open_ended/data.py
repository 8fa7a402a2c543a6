"""Prompts for open-ended continuation, with the human continuation (for MAUVE) when the data has one."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ipa.data import PromptDataModule, read_records


def field(row: Any, path: str) -> Any:
    """``row[path]``; a dotted path reads nested objects (``"prompt.text"``). None where a step is missing."""
    value = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def first_words(text: str, n: Optional[int]) -> str:
    """The first ``n`` whitespace-separated words of ``text`` joined by spaces (None: the text as is)."""
    return text if n is None else " ".join(text.split()[:n])


class OpenEndedDataModule(PromptDataModule):
    """Text prompts to continue, split at random (seeded) into test, val and train.

    Each row gives a prompt (``prompt_field``, optionally cut to its first ``prompt_words`` words) and,
    unless ``reference_field`` is None, the human continuation (``meta["references"]``), which MAUVE
    compares the generations with. With ``reference_field`` equal to ``prompt_field`` one text is split
    in two: its first ``prompt_words`` words are the prompt and the words after them the human
    continuation (news articles, as XSum); texts with nothing after the prompt are left out.
    """

    def __init__(
        self,
        source: str,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        split: str = "train",
        prompt_field: str = "prompt",
        reference_field: Optional[str] = "continuation",
        prompt_words: Optional[int] = None,
        reference_words: Optional[int] = None,
        train_size: Optional[int] = None,
        val_size: int = 200,
        test_size: int = 1000,
        seed: int = 0,
    ):
        """
        Args:
            source: A local ``.jsonl``/``.parquet`` file of rows, or a hub dataset name (e.g. ``EdinburghNLP/xsum``).
            batch_size: Prompts per RL step and device.
            eval_batch_size: Prompts per validation/test/predict batch.
            num_workers: DataLoader worker processes.
            split: The hub dataset's split to read (a local file has one).
            prompt_field: Field of the prompt text; a dotted path reads a nested field (``prompt.text``).
            reference_field: Field of the human continuation (MAUVE's reference); None: no references.
                The prompt's own field: the text's words after the first ``prompt_words``.
            prompt_words: Keep the prompt's first this many words (None: the whole text).
            reference_words: Keep the continuation's first this many words, e.g. about as long as the
                generations, which MAUVE compares it with (None: the whole continuation).
            train_size: Training prompts (None: all that remain after test and val).
            val_size: Validation prompts.
            test_size: Test prompts.
            seed: Seed of the split.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        for name, value in (("prompt_words", prompt_words), ("reference_words", reference_words)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or None, got {value}")
        if reference_field == prompt_field and prompt_words is None:
            raise ValueError(
                f"reference_field is the prompt's own field {prompt_field!r}, so the continuation is the text after the "
                f"prompt: set prompt_words (e.g. 32), or set reference_field to another field or null"
            )

    def parse_row(self, where: str, row: Any) -> Optional[dict[str, Any]]:
        """A prompt item from one row (None: a text with nothing after the prompt to continue it)."""
        hp = self.hparams

        def text(name: str) -> str:
            value = field(row, name)
            if not isinstance(value, str) or not value.strip():
                keys = sorted(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
                raise ValueError(
                    f"{where}: field {name!r} must be a non-empty string, got {value!r} (the row has {keys}); "
                    f"set --data.init_args.prompt_field / reference_field to the row's field names"
                )
            return value

        prompt = text(hp.prompt_field)
        if hp.reference_field is None:
            return {"prompt": first_words(prompt, hp.prompt_words), "meta": {}}
        if hp.reference_field == hp.prompt_field:
            reference = " ".join(prompt.split()[hp.prompt_words :])
            if not reference:
                return None
        else:
            reference = text(hp.reference_field)
        return {"prompt": first_words(prompt, hp.prompt_words), "meta": {"references": first_words(reference, hp.reference_words)}}

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        rows = [self.parse_row(where, row) for where, row in read_records(hp.source, hp.split)]
        items = [item for item in rows if item is not None]
        self.split(items, hp.test_size, hp.val_size, hp.train_size, hp.seed, f"{hp.source}: {len(items)} usable prompts of {len(rows)} rows")
