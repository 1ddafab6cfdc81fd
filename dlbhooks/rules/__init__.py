"""Relevance rules by family; importing this package registers them all."""

from . import core, elementwise, linear, registry  # noqa: F401
