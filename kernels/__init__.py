"""Triton kernels of the ``triton`` backend and their launch planning, one module per fused op.

Installed as ``memenc_fast.kernels``. Each op module holds its ``@triton.jit`` kernels, the
configuration choosers (device limits are plain arguments), planning functions that take
preallocated outputs and return a ``_common.Launch``, and ``report_launches`` (the launches at
the SAM 2 shape, for the kernel report). Nothing here imports the rest of ``memenc_fast``: the
wrappers in ``memenc_fast.backends.triton`` check inputs, allocate outputs and run the launches.

This folder sits at the top of the repository, so code run from there (``python -c``, ``python
setup.py``, a tool that puts the repository on ``sys.path``) would find it as a top-level
``kernels`` module, hiding an installed package of that name (Hugging Face's, which transformers
5 installs and setuptools loads as a build plugin). Imported under that name, this file hands the
import over to the installed package, or says what the folder is.
"""

import sys


def _defer_to_installed_kernels() -> None:
    """Replace this module in ``sys.modules`` with an installed top-level ``kernels``.

    Every import finder is asked for ``kernels`` on ``sys.path`` without the repository root. A
    spec that still leads here (through a link, say) is skipped: running this file again would
    recurse. The import system returns whatever ``sys.modules`` holds once this file has run, so
    ``import kernels`` and its submodules then resolve in the installed package (if that package
    fails to run, the import system drops it from ``sys.modules`` and the error propagates).
    """
    import os
    from importlib.util import module_from_spec

    here = os.path.dirname(os.path.realpath(__file__))
    repository = os.path.dirname(here)
    # "" stands for the working directory, as the path finder reads it.
    elsewhere = [p for p in sys.path if not (isinstance(p, str) and os.path.realpath(p or os.curdir) == repository)]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(__name__, elsewhere) if find_spec is not None else None
        if spec is None or spec.loader is None:
            continue
        folders = [*(spec.submodule_search_locations or ()), *([os.path.dirname(spec.origin)] if spec.origin else [])]
        if any(os.path.realpath(folder) == here for folder in folders):
            continue
        module = module_from_spec(spec)
        sys.modules[__name__] = module
        spec.loader.exec_module(module)
        return
    raise ImportError(
        f"{here} is memenc-fast's Triton kernels folder, not a top-level 'kernels' module, and no "
        "other 'kernels' package is installed; memenc-fast installs it as memenc_fast.kernels",
        name=__name__, path=__file__)


if __name__ == "kernels":
    _defer_to_installed_kernels()
