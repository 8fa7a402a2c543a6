"""RL algorithms that train the adapter; choose one in YAML with ``class_path``."""

from .base import Algorithm
from .ppo import PPO
from .quark import Quark
from .rloo import RLOO

__all__ = ["Algorithm", "PPO", "Quark", "RLOO"]
