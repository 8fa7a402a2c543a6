"""Rewards: any scorer of decoded responses; what RL maximises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class Reward(ABC):
    """Scores responses; chosen in YAML by ``class_path``.

    ``__call__`` returns one float per sample under ``"reward"`` (what RL maximises) and under
    each further name in ``names`` (its parts, logged beside it).
    """

    names: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name for prompts, their decoded responses and per-prompt metadata."""


class ModelReward(nn.Module, Reward):
    """A reward computed by a frozen neural model (a classifier, an LM).

    Being a module of the IPAModule, it moves to the module's device (and is scored there, in
    batches); it stays in eval mode, never trains and is left out of checkpoints.
    """

    def freeze(self) -> None:
        """Call at the end of ``__init__``: no gradients, eval mode."""
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "ModelReward":
        return super().train(False)  # dropout stays off: one sample, one score

    @abstractmethod
    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name, as ``Reward.__call__`` (which ``nn.Module.__call__`` runs)."""
