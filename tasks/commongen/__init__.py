"""Lexically constrained generation on CommonGen: data, the coverage reward and IPA's evaluation."""

from .data import CommonGenDataModule
from .metrics import CommonGenEvaluation
from .reward import Coverage

__all__ = ["CommonGenDataModule", "CommonGenEvaluation", "Coverage"]
