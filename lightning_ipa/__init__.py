"""lightning_ipa: Inference-time Policy Adapters as a PyTorch Lightning framework."""

from .quiet import ignore_known_warnings

ignore_known_warnings()

# isort: split

from .adapters import Adapter, AdapterConfig
from .algorithms import PPO, RLOO, Algorithm, Quark
from .bases import LocalBase
from .data import PromptDataModule
from .evaluation import Evaluation, Perplexity
from .experts import DExperts, LogitArithmetic, ProxyTuning
from .module import IPAModule
from .policy import Sampling, TailoredPolicy
from .processor import AdapterLogitsProcessor
from .remote import RemoteBase
from .rewards import ModelReward, Reward

__all__ = [
    "Adapter", "AdapterConfig", "AdapterLogitsProcessor", "Algorithm", "DExperts", "Evaluation", "IPAModule", "LocalBase", "LogitArithmetic", "ModelReward", "PPO", "Perplexity",
    "PromptDataModule", "ProxyTuning", "Quark", "RLOO", "RemoteBase", "Reward", "Sampling", "TailoredPolicy",
]
