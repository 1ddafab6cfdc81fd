"""Composite rules for model families (registered by dotted class name; no imports needed)."""
