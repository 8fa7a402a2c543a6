"""Rewards for toxicity reduction: reward = 1 − toxicity of the response (the prompt is not scored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from detoxify import Detoxify
from profanity_check import predict_prob
from torch import Tensor

from lightning_ipa.bases import is_local_path, truncate_at_window
from lightning_ipa.rewards import ModelReward, Reward, classifier_scores


class DetoxifyReward(ModelReward):
    """reward = 1 − a Detoxify classifier's score of the response; ``toxicity`` = that score.

    A released model by name (downloaded by Detoxify on first use), or a local checkpoint in
    Detoxify's format: ``checkpoint`` (a torch file ``{"config": ..., "state_dict": ...}``) and
    ``huggingface_config_path`` (a folder with the transformer's config and tokenizer files).
    """

    names = ("toxicity",)

    def __init__(
        self,
        model: Literal["original", "unbiased", "multilingual", "original-small", "unbiased-small"] = "original",
        checkpoint: Optional[str] = None,
        huggingface_config_path: Optional[str] = None,
        head: str = "toxicity",
        batch_size: int = 64,
    ):
        """
        Args:
            model: Released Detoxify model (ignored when ``checkpoint`` is given).
            checkpoint: Local Detoxify checkpoint file (None: download the released ``model``).
            huggingface_config_path: Local folder of the checkpoint's transformer config and tokenizer
                (needed offline; the checkpoint's ``config.arch.args.model_type`` must name a local folder too).
            head: The classifier output used as toxicity (e.g. 'toxicity', 'severe_toxicity', 'insult').
            batch_size: Responses per classifier pass.

        Raises:
            FileNotFoundError: no such ``checkpoint`` file, or no such ``huggingface_config_path`` folder (``bases.is_local_path``).
            RuntimeError: the weights cannot be loaded (offline: the message says how to pass local ones).
        """
        super().__init__()
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no such file: {checkpoint} (checkpoint: a Detoxify checkpoint file); check the path")
        if huggingface_config_path is not None and is_local_path(huggingface_config_path) and not Path(huggingface_config_path).is_dir():
            raise FileNotFoundError(
                f"no such folder: {huggingface_config_path} (huggingface_config_path: the transformer's config and tokenizer, "
                "saved with save_pretrained); check the path"
            )
        try:
            detoxify = Detoxify(model, checkpoint=checkpoint, huggingface_config_path=huggingface_config_path)
        except OSError as error:  # no network (URLError is an OSError), or a hub name where a folder was needed
            how = (
                "pass a local checkpoint: checkpoint=FILE (Detoxify's released .ckpt) and huggingface_config_path=DIR "
                "(the transformer's config and tokenizer, saved with save_pretrained)"
            )
            what = f"Detoxify's released {model!r} weights" if checkpoint is None else f"the Detoxify checkpoint {checkpoint}"
            raise RuntimeError(f"could not load {what} ({type(error).__name__}: {error}). Offline, {how}") from error
        if head not in detoxify.class_names:
            raise ValueError(f"head {head!r} is not an output of this Detoxify model; it has {detoxify.class_names}")
        self.classifier = detoxify.model
        self.tokenizer = truncate_at_window(detoxify.tokenizer, self.classifier)  # longer responses: their start
        self.head_index = detoxify.class_names.index(head)
        self.batch_size = batch_size
        self.freeze()

    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        toxicity = classifier_scores(self.classifier, self.tokenizer, responses, self.head_probability, self.batch_size)
        return {"reward": 1 - toxicity, "toxicity": toxicity}

    def head_probability(self, logits: Tensor) -> Tensor:
        """The toxicity [b], the probability of ``head``, from a classifier pass's logits [b, heads] (a sigmoid each:
        Detoxify's heads are independent labels)."""
        return logits[:, self.head_index].float().sigmoid()


class ProfanityReward(Reward):
    """reward = 1 − the probability that the response is offensive under alt-profanity-check.

    A linear model over character and word n-grams shipped in the package's wheel: it runs
    offline in microseconds per text, and knows profanity and insults rather than subtler toxicity.
    """

    names = ("toxicity",)

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        toxicity = torch.tensor(predict_prob(responses) if responses else [], dtype=torch.float32)
        return {"reward": 1 - toxicity, "toxicity": toxicity}
