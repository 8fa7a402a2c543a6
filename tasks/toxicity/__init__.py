"""Toxicity reduction on RealToxicityPrompts: data, rewards (Detoxify, profanity) and the evaluation protocol."""

from .data import RealToxicityPromptsDataModule
from .metrics import ToxicityEvaluation
from .reward import DetoxifyReward, ProfanityReward

__all__ = ["DetoxifyReward", "ProfanityReward", "RealToxicityPromptsDataModule", "ToxicityEvaluation"]
