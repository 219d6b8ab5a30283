"""recsys_torch: matrix-factorization recommenders in PyTorch, from popularity to hybrids."""

__version__ = "0.1.0"
