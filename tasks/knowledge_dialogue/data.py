"""Knowledge-grounded dialogue: (knowledge, history) → response rows of FaithDial, Wizard of Wikipedia or a local file."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ipa.data import PromptDataModule, read_records
from tasks.dialogue_safety.dialogue import DialogueFormat, check_template, reference_field, turns_field

HUB_NAME = "McGill-NLP/FaithDial"
PROMPT_TEMPLATE = "Knowledge: {knowledge}\n{history}\n{assistant}:"


def knowledge_field(row: dict[str, Any], field: str, where: str, expected: str) -> str:
    """The knowledge text: a string, a list of sentences, or a mapping to sentences (WoW's ``checked_sentence``), joined by spaces."""
    value = row.get(field)
    parts = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts) or not " ".join(parts).strip():
        raise ValueError(
            f"{where}: {field!r} must be non-empty text (a string, a list of strings or an object of strings), got {value!r}; "
            f"expected {expected}"
        )
    return " ".join(p.strip() for p in parts if p.strip())


class KnowledgeDialogueDataModule(PromptDataModule):
    """Turns of knowledge-grounded dialogues: the knowledge and the history before a response, split at random (seeded).

    Each item's meta: ``knowledge`` (what the response must be faithful to), ``history`` (the shown turns,
    one per line, without speakers) and ``references`` (the gold response, for BLEU and ROUGE).
    """

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        source: str = HUB_NAME,
        split: str = "train",
        knowledge_field: str = "knowledge",
        history_field: str = "history",
        response_field: str = "response",
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
            source: Hub dataset name (FaithDial: ``McGill-NLP/FaithDial``, one row per wizard turn with
                ``knowledge``, ``history``, ``response``), or a local ``.jsonl``/``.parquet`` file.
            split: The hub dataset's split to read (then split again into test/val/train here).
            knowledge_field: Row field with the knowledge: a string, a list of sentences or an object of sentences
                (e.g. Wizard of Wikipedia's ``checked_sentence``).
            history_field: Row field with the dialogue before the response: a list of turns oldest first
                (may be empty), or one utterance.
            response_field: Row field with the gold response(s): a string or a list of strings.
            dialogue: How the history's turns are written (speakers, turn template, separator, turns kept).
            prompt_template: The prompt; placeholders ``{knowledge}``, ``{history}`` (the formatted turns) and
                ``{assistant}`` (the model's speaker name). With ``model.base.chat_template`` the base's chat
                template wraps it.
            train_size: Training prompts (None: all that remain after test and val).
            val_size: Validation prompts.
            test_size: Test prompts.
            seed: Seed of the split.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.dialogue = dialogue  # under the CLI, hparams hold the parsed config rather than the object
        check_template(prompt_template, "prompt_template", {"knowledge", "history", "assistant"}, {"knowledge", "history"})

    def parse_row(self, where: str, row: Any) -> dict[str, Any]:
        """A prompt item from one row."""
        hp = self.hparams
        expected = (
            f"a row with {hp.knowledge_field!r} (text), {hp.history_field!r} (a list of turns) and {hp.response_field!r} "
            "(the gold response), as FaithDial's"
        )
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object, got {type(row).__name__}; expected {expected}")
        knowledge = knowledge_field(row, hp.knowledge_field, where, expected)
        turns = self.dialogue.kept(turns_field(row, hp.history_field, where, expected, allow_empty=True))
        references = reference_field(row, hp.response_field, where, expected)
        if not references:
            got = row.get(hp.response_field)
            raise ValueError(f"{where}: {hp.response_field!r} must hold the gold response, got {got!r}; expected {expected}")
        prompt = hp.prompt_template.format(knowledge=knowledge, history=self.dialogue.format(turns), assistant=self.dialogue.assistant)
        return {"prompt": prompt, "meta": {"knowledge": knowledge, "history": "\n".join(turns), "references": references}}

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        items = [self.parse_row(where, row) for where, row in read_records(hp.source, hp.split)]
        self.split(items, hp.test_size, hp.val_size, hp.train_size, hp.seed, f"{hp.source}: {len(items)} dialogues")
