"""ctypes binding of ``libmemenc_fast_cuda.so``, the CUDA kernels of ``csrc/``.

The library is plain nvcc output with ``extern "C"`` launchers (no torch headers, no torch C++
ABI), so one build serves every torch version. Each launcher takes raw device pointers, sizes,
element strides, a dtype code, the device index and a ``cudaStream_t``, and returns a CUDA error
code; :meth:`CudaLibrary.call` turns a non-zero code into an exception carrying the CUDA runtime's
text for it.

Importing this module touches neither the library nor the GPU; :func:`load` opens the library on
first use and :func:`unavailable_reason` says in one line why the ``cuda`` backend cannot run.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "LIBRARY_NAME",
    "ABI_VERSION",
    "DTYPE_CODES",
    "EXPORTS",
    "CudaLibraryError",
    "CudaLaunchError",
    "CudaLibrary",
    "library_path",
    "load",
    "unavailable_reason",
]

LIBRARY_NAME = "libmemenc_fast_cuda.so"
ABI_VERSION = 1
"""The exported signatures this binding declares; csrc/library.cu reports the library's."""

DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Element type codes of the launchers (``mf::DType`` in csrc/common.cuh)."""

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_LAUNCH_TAIL = [_I, _P]  # device index, cudaStream_t

EXPORTS: Dict[str, Tuple[object, Sequence[object]]] = {
    "memenc_fast_cuda_abi_version": (_I, []),
    "memenc_fast_cuda_error_string": (ctypes.c_char_p, [_I]),
    "memenc_fast_cuda_device_count": (_I, [ctypes.POINTER(_I)]),
    "memenc_fast_mask_stem_supported": (_I, [_I, _I, _I]),
    "memenc_fast_mask_stem": (
        _I,
        [_I, _P, _L, _L, _L, _I, _I, _I, _P, _P, _P, _P, _F, _P, _P, _P, _P, _F, _I, _F, _F, _P] + _LAUNCH_TAIL,
    ),
    "memenc_fast_conv3x3s2_ln_gelu_supported": (_I, [_I, _I]),
    "memenc_fast_conv3x3s2_ln_gelu": (
        _I,
        [_I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _P, _F, _I, _P] + _LAUNCH_TAIL,
    ),
    "memenc_fast_proj_add_supported": (_I, [_I, _I, _I]),
    "memenc_fast_proj_add": (
        _I,
        [_I, _P, _L, _L, _L, _I, _P, _L, _L, _L, _I, _I, _I, _P, _P, _I, _I, _P] + _LAUNCH_TAIL,
    ),
    "memenc_fast_dwconv_ln_supported": (_I, [_I, _I]),
    "memenc_fast_dwconv_ln": (_I, [_I, _P, _I, _I, _I, _I, _P, _I, _P, _P, _F, _P, _P] + _LAUNCH_TAIL),
}
"""Every function the library exports: name -> (restype, argtypes)."""


class CudaLibraryError(RuntimeError):
    """The library is missing, does not load, or is not the version this binding expects."""


class CudaLaunchError(RuntimeError):
    """A launcher returned a CUDA error; the message names the launcher and the CUDA error."""


class CudaLibrary:
    """The loaded library with every export's signature declared."""

    def __init__(self, path: Path) -> None:
        try:
            self._dll = ctypes.CDLL(str(path))
        except OSError as err:
            raise CudaLibraryError(f"the CUDA library {path.name} failed to load: {err}") from None
        missing = [name for name in EXPORTS if not hasattr(self._dll, name)]
        if missing:
            raise CudaLibraryError(f"the CUDA library {path.name} lacks {', '.join(missing)}; rebuild it "
                                   "(pip install -e .)")
        for name, (restype, argtypes) in EXPORTS.items():
            function = getattr(self._dll, name)
            function.restype = restype
            function.argtypes = list(argtypes)
        version = self._dll.memenc_fast_cuda_abi_version()
        if version != ABI_VERSION:
            raise CudaLibraryError(f"the CUDA library {path.name} has ABI version {version}, this package "
                                   f"expects {ABI_VERSION}; rebuild it (pip install -e .)")
        self.path = path

    def error_string(self, code: int) -> str:
        """The CUDA runtime's text for an error code."""
        return self._dll.memenc_fast_cuda_error_string(code).decode(errors="replace")

    def supported(self, name: str, *args: int) -> bool:
        """``memenc_fast_<name>_supported(*args)``: whether a kernel exists for these sizes."""
        return bool(getattr(self._dll, f"memenc_fast_{name}_supported")(*args))

    def device_count(self) -> Tuple[int, int]:
        """(CUDA devices the library's runtime sees, the CUDA error code of asking)."""
        count = _I(0)
        code = self._dll.memenc_fast_cuda_device_count(ctypes.byref(count))
        return count.value, code

    def call(self, name: str, *args: object) -> None:
        """Runs launcher ``memenc_fast_<name>``; raises CudaLaunchError on a CUDA error."""
        code = getattr(self._dll, f"memenc_fast_{name}")(*args)
        if code != 0:
            raise CudaLaunchError(f"memenc_fast {name}: CUDA error {code}: {self.error_string(code)}")


def library_path() -> Path:
    """Where the build puts the library: ``memenc_fast/_lib/libmemenc_fast_cuda.so``."""
    return Path(__file__).resolve().parent.parent / "_lib" / LIBRARY_NAME


@functools.lru_cache(maxsize=None)
def load(path: Optional[Path] = None) -> CudaLibrary:
    """The library at ``path`` (default :func:`library_path`), loaded once.

    Raises CudaLibraryError with a one-line reason when it is missing or unusable.
    """
    path = library_path() if path is None else path
    if not path.is_file():
        raise CudaLibraryError("the CUDA library was not built (pip install -e . with nvcc)")
    return CudaLibrary(path)


def unavailable_reason() -> Optional[str]:
    """None when the ``cuda`` backend can run here, else why not, in one line."""
    try:
        load()
    except CudaLibraryError as err:
        return str(err)
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
