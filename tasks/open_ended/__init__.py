"""Open-ended generation: text prompts to continue and MAUVE; the reward composes the engine's diversity, coherence and fluency."""

from .data import OpenEndedDataModule
from .metrics import MAUVE, OpenEndedEvaluation

__all__ = ["MAUVE", "OpenEndedDataModule", "OpenEndedEvaluation"]
