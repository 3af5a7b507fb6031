"""Triton kernels, shipped as ``csp_inductor.kernels``. Importing this package needs Triton."""
