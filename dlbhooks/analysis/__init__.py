"""Analyses built on explanations (expert statistics over a corpus)."""

from .experts import ExpertStats

__all__ = ["ExpertStats"]
