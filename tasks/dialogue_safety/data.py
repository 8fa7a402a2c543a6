"""Dialogue contexts to answer safely: DiaSafety, ProsocialDialog or any (context → response) rows."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ipa.data import PromptDataModule, read_records

from .dialogue import DialogueFormat, check_template, reference_field, turns_field

HUB_NAME = "thu-coai/diasafety"
PROMPT_TEMPLATE = "{history}\n{assistant}:"


class DialogueSafetyDataModule(PromptDataModule):
    """Dialogue contexts (one utterance or a list of turns) formatted into prompts, split at random (seeded).

    Each item's meta: ``history`` (the shown turns, one per line, without speakers: what coherence compares
    the response with), ``last_turn`` (the utterance being answered) and ``references`` (the dataset's
    response, when ``response_field`` is set and the row has one).
    """

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        source: str = HUB_NAME,
        split: str = "train",
        context_field: str = "context",
        response_field: Optional[str] = "response",
        dialogue: DialogueFormat = DialogueFormat(),
        prompt_template: str = PROMPT_TEMPLATE,
        train_size: Optional[int] = None,
        val_size: int = 500,
        test_size: int = 1000,
        seed: int = 0,
    ):
        """
        Args:
            batch_size: Prompts per RL step and device.
            eval_batch_size: Prompts per validation/test/predict batch (each sampled k times: keep k × this moderate).
            num_workers: DataLoader worker processes.
            source: Hub dataset name (DiaSafety ``thu-coai/diasafety``, ProsocialDialog ``allenai/prosocial-dialog``,
                both with ``context`` and ``response``), or a local ``.jsonl``/``.parquet`` file.
            split: The hub dataset's split to read (then split again into test/val/train here).
            context_field: Row field with the dialogue context: one utterance, or a list of turns oldest first.
            response_field: Row field with a reference response, kept as ``meta["references"]`` (None: no references).
            dialogue: How the context's turns are written (speakers, turn template, separator, turns kept).
            prompt_template: The prompt; placeholders ``{history}`` (the formatted turns) and ``{assistant}``
                (the model's speaker name). With ``model.base.chat_template`` the base's chat template wraps it.
            train_size: Training prompts (None: all that remain after test and val).
            val_size: Validation prompts.
            test_size: Test prompts.
            seed: Seed of the split.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.dialogue = dialogue  # under the CLI, hparams hold the parsed config rather than the object
        check_template(prompt_template, "prompt_template", {"history", "assistant"}, {"history"})

    def parse_row(self, where: str, row: Any) -> dict[str, Any]:
        """A prompt item from one row."""
        hp = self.hparams
        expected = f"a row with {hp.context_field!r} (a string or a list of turns)" + (
            f" and optionally {hp.response_field!r} (the reference response)" if hp.response_field else ""
        )
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object, got {type(row).__name__}; expected {expected}")
        turns = self.dialogue.kept(turns_field(row, hp.context_field, where, expected))
        prompt = hp.prompt_template.format(history=self.dialogue.format(turns), assistant=self.dialogue.assistant)
        meta = {"history": "\n".join(turns), "last_turn": turns[-1], "references": reference_field(row, hp.response_field, where, expected)}
        return {"prompt": prompt, "meta": meta}

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        items = [self.parse_row(where, row) for where, row in read_records(hp.source, hp.split)]
        self.split(items, hp.test_size, hp.val_size, hp.train_size, hp.seed, f"{hp.source}: {len(items)} dialogues")
