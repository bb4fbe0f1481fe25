"""FireFlow: fast inversion of rectified flow for training-free image editing."""

__version__ = "0.1.0"
