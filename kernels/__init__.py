"""Triton kernels of the ``triton`` backend, one module per fused op.

Installed as ``memenc_fast.kernels``. Each module holds its ``@triton.jit`` kernels, the launcher
that picks the configuration and checks its inputs, the op wrapper that
``memenc_fast.backends.triton_ops`` exposes, and ``report_specs`` for the kernel report.
"""
