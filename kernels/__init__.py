"""Triton kernels of the ``triton`` backend and their launch planning, one module per fused op.

Installed as ``memenc_fast.kernels``. Each op module holds its ``@triton.jit`` kernels, the
configuration choosers (device limits are plain arguments), planning functions that take
preallocated outputs and return a ``_common.Launch``, and ``report_launches`` (the launches at
the SAM 2 shape, for the kernel report). Nothing here imports the rest of ``memenc_fast``: the
wrappers in ``memenc_fast.backends.triton`` check inputs, allocate outputs and run the launches.
"""
