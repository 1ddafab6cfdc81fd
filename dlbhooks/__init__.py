"""dlbhooks: DLBacktrace relevance for PyTorch models, through forward hooks.

    import dlbhooks as dlb
    with dlb.trace(model) as tape:
        out = model(x)
    exp = tape.explain(target=None, mode="default")
"""

from . import models, rules  # noqa: F401  (registers every rule)
from .analysis import ExpertStats
from .api import explain
from .corpus import corpus_expert_stats, corpus_map, corpus_token_relevance
from .coverage import coverage
from .errors import (
    DLBError,
    FunctionalGapError,
    NonFiniteError,
    OffloadError,
    OutOfMemoryError,
    RecordModifiedError,
    RecordReleasedError,
    SavedFileError,
    TargetError,
    TraceError,
    UnsupportedModuleError,
)
from .generation import GenerationExplanation, explain_generation
from .memory import MemoryEstimate, estimate_memory, record_bytes
from .pipeline import run_task
from .records import Record, Tape
from .relevance import Streams
from .results import Explanation
from .rules.contract import RuleContext, RuleResult, stacked_rule
from .rules.elementwise import register_saturation
from .rules.functions import register_function_rule
from .rules.registry import register_rule, unregister_rule
from .storage import Storage
from .trace import trace
from .weights import register_dequantizer, set_weight_cache

__version__ = "0.1.0"

__all__ = [
    "DLBError", "ExpertStats", "Explanation", "FunctionalGapError", "GenerationExplanation",
    "MemoryEstimate",
    "NonFiniteError", "OffloadError", "OutOfMemoryError", "Record", "RecordModifiedError",
    "RecordReleasedError",
    "RuleContext", "RuleResult", "SavedFileError", "Storage", "Streams", "Tape", "TargetError",
    "TraceError", "UnsupportedModuleError",
    "coverage", "estimate_memory",
    "explain", "explain_generation", "record_bytes", "register_dequantizer",
    "register_function_rule", "register_rule", "run_task",
    "register_saturation",
    "set_weight_cache", "stacked_rule", "trace", "unregister_rule",
]
__all__ += ["corpus_expert_stats", "corpus_map", "corpus_token_relevance"]
