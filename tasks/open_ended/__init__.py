"""Open-ended generation: text prompts to continue, a diversity reward (composed with coherence and fluency) and MAUVE."""

from .data import OpenEndedDataModule
from .metrics import MAUVE, OpenEndedEvaluation
from .reward import Diversity, diversity

__all__ = ["MAUVE", "Diversity", "OpenEndedDataModule", "OpenEndedEvaluation", "diversity"]
