"""fastwan: sparse distillation (DMD2 + Video Sparse Attention) for Wan video transformers."""

__version__ = "0.1.0"
