"""Self-supervised rewiring of pre-trained speech encoders, on PyTorch Lightning."""

__version__ = "0.1.0"
