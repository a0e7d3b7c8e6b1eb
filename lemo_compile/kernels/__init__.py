"""Compute kernels, one module per family, each beside its pure-torch reference.

The references here are what `lemo_compile.ops` runs for tensors that are not on CUDA (and, until a
family has its Triton kernel, on CUDA too).
"""
