"""Composite rules for torchvision CNN families (being written)."""
