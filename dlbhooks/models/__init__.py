"""Composite rules for model families, registered by dotted class name (importing this
package does not import torchvision or transformers)."""

from . import hf_attention, hf_families, torchvision_cnn, torchvision_vit  # noqa: F401
