"""Triton kernels of isnet-fast, installed as ``isnet_fast.kernels``."""
