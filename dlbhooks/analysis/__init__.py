"""Analyses built on explanations (expert statistics over a corpus, expert pruning)."""

from .experts import ExpertStats
from .pruning import drop_experts, pruned, write_pruned_checkpoint

__all__ = ["ExpertStats", "drop_experts", "pruned", "write_pruned_checkpoint"]
