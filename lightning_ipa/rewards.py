"""Rewards: any scorer of decoded responses; what RL maximises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor


class Reward(ABC):
    """Scores responses; chosen in YAML by ``class_path``.

    ``__call__`` returns one float per sample under ``"reward"`` (what RL maximises) and under
    each further name in ``names`` (its parts, logged beside it).
    """

    names: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name for prompts, their decoded responses and per-prompt metadata."""
