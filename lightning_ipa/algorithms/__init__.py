"""RL algorithms that train the adapter; choose one in YAML with ``class_path``."""

from .base import Algorithm
from .ppo import PPO
from .rloo import RLOO

__all__ = ["Algorithm", "PPO", "RLOO"]
