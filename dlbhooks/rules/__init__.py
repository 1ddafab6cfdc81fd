"""Relevance rules by family; importing this package registers them all."""

from . import (  # noqa: F401
    attention,
    core,
    elementwise,
    embedding,
    experts,
    functions,
    linear,
    norm,
    pooling,
    recurrent,
    registry,
)
