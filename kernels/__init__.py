"""Triton kernels (fused ops with eager twins in adarec/); imported as adarec.kernels."""
