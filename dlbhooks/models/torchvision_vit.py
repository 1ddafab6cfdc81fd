"""Composite rules for torchvision ViT (being written)."""
