"""Dialogue safety: answer (possibly unsafe) dialogue contexts safely and coherently.

``dialogue`` (history formatting, row fields, the seeded split) and ``metrics.require_scores`` are shared with
``tasks.knowledge_dialogue``.
"""

from .data import DialogueSafetyDataModule
from .dialogue import DialogueFormat
from .metrics import DialogueSafetyEvaluation

__all__ = ["DialogueFormat", "DialogueSafetyDataModule", "DialogueSafetyEvaluation"]
