"""Developer tools behind ``python -m memenc_fast``: ``check``, ``bench``, the kernel report, the
presets and accuracy rule they share. ``import memenc_fast`` loads none of these."""
