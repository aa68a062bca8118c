"""ProCo (MICCAI 2022): prototype-aware contrastive learning for long-tailed medical images, on Ray."""

__version__ = "0.1.0"
