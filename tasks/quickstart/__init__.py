"""Quickstart: lexically constrained generation, one sentence using three given words."""

from .data import ConceptsDataModule
from .reward import ConceptCoverage

__all__ = ["ConceptCoverage", "ConceptsDataModule"]
