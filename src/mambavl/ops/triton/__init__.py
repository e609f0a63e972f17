"""Triton kernels for the ops in `mambavl.ops`, each tested against its PyTorch reference."""
