"""Knowledge-grounded dialogue (FaithDial): respond faithfully to the given knowledge and coherently to the history.

Dialogue formatting and splitting come from ``tasks.dialogue_safety.dialogue``.
"""

from .data import KnowledgeDialogueDataModule
from .metrics import KnowledgeDialogueEvaluation

__all__ = ["KnowledgeDialogueDataModule", "KnowledgeDialogueEvaluation"]
