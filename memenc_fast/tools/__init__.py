"""Developer tools behind ``python -m memenc_fast``: ``check``, ``bench``, ``info``, the kernel
report (``kernels``), and the presets and accuracy rule they share. ``import memenc_fast`` loads
none of these."""
