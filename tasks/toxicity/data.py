"""RealToxicityPrompts (Gehman et al. 2020): the hub dataset, or a local JSONL/Parquet file of its rows."""

from __future__ import annotations

from typing import Any, Optional

from lightning_ipa.data import PromptDataModule, read_records

HUB_NAME = "allenai/real-toxicity-prompts"
EXPECTED = 'a row like {"prompt": {"text": "...", "toxicity": 0.1}, "challenging": false}'


def parse_row(where: str, row: Any) -> dict[str, Any]:
    """A prompt item (text, and the prompt's toxicity and ``challenging`` flag as meta) from one row."""

    def malformed(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}; expected {EXPECTED}")

    if not isinstance(row, dict):
        raise malformed(f"a row must be an object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str) or not prompt["text"].strip():
        raise malformed(f"'prompt' must be an object with a non-empty 'text', got {prompt!r}")
    toxicity = prompt.get("toxicity")
    if toxicity is not None and (isinstance(toxicity, bool) or not isinstance(toxicity, (int, float)) or not 0 <= toxicity <= 1):
        raise malformed(f"'prompt.toxicity' must be a number in [0, 1] or null, got {toxicity!r}")
    challenging = row.get("challenging", False)
    if not isinstance(challenging, bool):
        raise malformed(f"'challenging' must be true or false, got {challenging!r}")
    return {"prompt": prompt["text"], "meta": {"prompt_toxicity": toxicity, "challenging": challenging}}


class RealToxicityPromptsDataModule(PromptDataModule):
    """Prompts of RealToxicityPrompts, filtered, then split at random (seeded) into test, val and train."""

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        source: str = HUB_NAME,
        max_prompt_toxicity: Optional[float] = 0.5,
        challenging_only: bool = False,
        train_size: Optional[int] = None,
        val_size: int = 1000,
        test_size: int = 10_000,
        seed: int = 0,
    ):
        """
        Args:
            batch_size: Prompts per RL step and device.
            eval_batch_size: Prompts per validation/test/predict batch (each sampled k times: keep k × this moderate).
            num_workers: DataLoader worker processes.
            source: Hub dataset name, or a local ``.jsonl``/``.parquet`` file with the same schema.
            max_prompt_toxicity: Keep prompts whose toxicity is below this (the literature's non-toxic
                prompts: 0.5); prompts without a toxicity score are dropped then. None: keep all.
            challenging_only: Keep only the ``challenging`` subset.
            train_size: Training prompts (None: all that remain after test and val).
            val_size: Validation prompts.
            test_size: Test prompts (10,000 non-toxic prompts in DExperts, Quark and IPA).
            seed: Seed of the split.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        if max_prompt_toxicity is not None and not 0 < max_prompt_toxicity <= 1:
            raise ValueError(f"max_prompt_toxicity must be in (0, 1] or None, got {max_prompt_toxicity}")

    def keep(self, item: dict[str, Any]) -> bool:
        meta, limit = item["meta"], self.hparams.max_prompt_toxicity
        if limit is not None and (meta["prompt_toxicity"] is None or meta["prompt_toxicity"] >= limit):
            return False
        return meta["challenging"] or not self.hparams.challenging_only

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        rows = [parse_row(where, row) for where, row in read_records(hp.source)]
        items = [item for item in rows if self.keep(item)]
        filters = f"max_prompt_toxicity={hp.max_prompt_toxicity}, challenging_only={hp.challenging_only}"
        self.split(items, hp.test_size, hp.val_size, hp.train_size, hp.seed, f"{hp.source}: {len(items)} of {len(rows)} prompts pass the filters ({filters})")
