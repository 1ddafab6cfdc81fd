"""Analyses built on explanations: expert statistics over a corpus (``experts``, data in
``texts``), their stability (``stability``), and expert pruning — masked routing and
smaller models (``pruning``), checkpoints on disk (``checkpoint``), held-out evaluation
(``prune_eval``)."""

from .checkpoint import moe_layout, prune_checkpoint
from .experts import ExpertStats
from .prune_eval import PruningEvaluation, evaluate_pruning, pruning_plan
from .pruning import drop_experts, pruned, write_pruned_checkpoint

__all__ = ["ExpertStats", "PruningEvaluation", "drop_experts", "evaluate_pruning",
           "moe_layout", "prune_checkpoint", "pruned", "pruning_plan",
           "write_pruned_checkpoint"]
