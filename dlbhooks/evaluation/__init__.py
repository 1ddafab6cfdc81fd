"""Evaluating attributions: metrics (perturbation curves, ABPC, faithfulness correlation,
complexity, sparseness, robustness, the randomisation sanity check, DLBacktrace's
conservation) and attribution methods to compare (DLBacktrace, gradient × input,
integrated gradients, random and recency baselines), for any model, vectorised over a
batch.

    from dlbhooks.evaluation import abpc, dlbhooks_attribution
    attribute = dlbhooks_attribution(mode="default")
    r = attribute(model, x, target)
    result = abpc(model, x, r, target, replace=0.0, steps=10)   # result.delta: [B]
"""

from .attributions import (
    Attribution,
    dlbhooks_attribution,
    gradient_x_input,
    integrated_gradients,
    random_attribution,
    recency_attribution,
    score,
)
from .metrics import (
    ABPC,
    Curve,
    abpc,
    average_ranks,
    complexity,
    conservation_report,
    faithfulness_correlation,
    max_sensitivity,
    mprt,
    pearson,
    perturbation_curve,
    randomisation_check,
    sparseness,
    spearman,
)

__all__ = [
    "ABPC", "Attribution", "Curve", "abpc", "average_ranks", "complexity",
    "conservation_report", "dlbhooks_attribution", "faithfulness_correlation",
    "gradient_x_input", "integrated_gradients", "max_sensitivity", "mprt", "pearson",
    "perturbation_curve", "random_attribution", "randomisation_check", "recency_attribution",
    "score", "sparseness", "spearman",
]
