"""Test-only helpers shared by several test files (the package's presets hold the rest)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import types
from typing import Dict, Iterator, List, Tuple

import pytest
import torch

import memenc_fast as mf
from memenc_fast.tools.presets import PRESETS, Preset, build_encoder, make_inputs, randomize_parameters  # noqa: F401

requires_sam2 = pytest.mark.skipif(
    importlib.util.find_spec("sam2") is None, reason="sam2 is not installed (see README: tests)"
)


CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
"""A GPU test's marks: ``-m gpu`` selects it (the GPU campaign runs those); skipped without a CUDA device."""


@contextlib.contextmanager
def tf32_matmuls(allowed: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32`` set to ``allowed`` inside, as a user may set it."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@contextlib.contextmanager
def tf32_settings(conv: bool, matmul: bool) -> Iterator[None]:
    """torch's TF32 flags for fp32 convolutions (``torch.backends.cudnn.allow_tf32``, which the
    reference's Conv2d layers obey) and matmuls (``torch.backends.cuda.matmul.allow_tf32``, its
    Linear layers) set inside, as a user sets them."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def requires_cuda(test):
    """Marks ``test`` as a GPU test (``CUDA_MARKS``)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# The backends that serve CUDA tensors; without a GPU every registered one, so that the skipped GPU
# tests still name them all.
CUDA_BACKENDS = mf.available_backends("cuda") if torch.cuda.is_available() else mf.dispatch.registered_backends()
CUDA_FUSED_BACKENDS = [b for b in CUDA_BACKENDS if b != "reference"]


def backend_device_params(fused_only: bool = False) -> List[object]:
    """(backend, device) pytest params: each backend that serves CPU tensors on "cpu", and each that
    serves CUDA tensors on "cuda" (GPU tests, skipped without a CUDA device)."""
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in mf.available_backends("cpu")]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=CUDA_MARKS) for b in CUDA_BACKENDS]
    return [p for p in params if not (fused_only and p.values[0] == "reference")]


def stub_backend(name: str, ops: Dict[str, object], unsupported: Dict[str, str] = None, priority: int = -1,
                 auto_skip: str = None) -> "mf.dispatch.Backend":
    """A CPU float32 backend named ``name`` whose ops module holds ``ops`` (and an
    ``unsupported_ops`` refusing ``unsupported``, an ``auto_skip_reason`` saying ``auto_skip``),
    for ``monkeypatch.setitem(dispatch._registry, ...)``."""
    module = types.ModuleType(f"{name}_ops")
    for op, fn in ops.items():
        setattr(module, op, fn)
    module.unsupported_ops = lambda structure, device, dtype: dict(unsupported or {})
    module.auto_skip_reason = lambda device, dtype: auto_skip
    backend = mf.dispatch.Backend(name=name, priority=priority, device_types=frozenset({"cpu"}),
                                  dtypes=frozenset({torch.float32}), ops_module=module.__name__,
                                  unavailable_reason=lambda: None)
    backend._module.append(module)
    return backend


# A preset small enough for many CPU runs, with every sam2 structural feature (4 stages, 2 blocks).
TINY = Preset("tiny", mask_size=64, feature_size=4, in_dim=32, out_dim=16)


def reference_outputs(encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor,
                      dtype: torch.dtype, **kwargs) -> Dict[str, object]:
    """The reference forward of a copy of ``encoder`` in ``dtype`` (float64 for the oracle)."""
    twin = copy.deepcopy(encoder).to(dtype)
    with torch.no_grad(), mf.use_backend("reference"):
        return twin(pix_feat.to(dtype), masks.to(dtype), **kwargs)


def sam2_config_files() -> List[Tuple[str, str]]:
    """(name, path) of every sam2 / sam2.1 model config shipped in the installed sam2 package."""
    import sam2

    root = os.path.join(os.path.dirname(sam2.__file__), "configs")
    found = []
    for folder in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".yaml"):
                found.append((f"{folder}/{name}", os.path.join(root, folder, name)))
    return found


def memory_encoder_config(path: str):
    """The memory_encoder section of a sam2 config file (model or training config)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(path)
    for key in ("model.memory_encoder", "trainer.model.memory_encoder"):
        section = OmegaConf.select(config, key)
        if section is not None:
            return section
    raise AssertionError(f"{path} has no memory_encoder section")


def retarget_to_memenc_fast(section):
    """The same config with every sam2 memory-encoder class replaced by memenc_fast's."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(section)
    for prefix in ("sam2.modeling.memory_encoder.", "sam2.modeling.position_encoding."):
        text = text.replace(prefix, "memenc_fast.")
    return OmegaConf.create(text)


@functools.lru_cache(maxsize=None)
def load_sam3_modules():
    """sam3's ``model.memory`` and ``model.position_encoding`` modules, or skip.

    sam3's package ``__init__`` builds whole models and imports torchvision, which does not import
    beside the CPU torch used in CI; so the two modules are loaded under bare package objects for
    ``sam3`` and ``sam3.model``. Where torchvision is absent, timm (imported by sam3.model.memory
    for DropPath) cannot import either, and a stand-in ``timm.layers.DropPath`` (same math as
    timm's) takes its place.
    """
    import importlib
    import sys
    import types

    spec = importlib.util.find_spec("sam3")
    if spec is None:
        pytest.skip("sam3 is not installed (pip install --no-deps sam3)")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("sam3", root), ("sam3.model", os.path.join(root, "model"))):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    try:
        importlib.import_module("timm.layers")
    except Exception:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        from memenc_fast.reference import DropPath

        timm = types.ModuleType("timm")
        layers = types.ModuleType("timm.layers")
        layers.DropPath = DropPath
        timm.layers = layers
        sys.modules["timm"], sys.modules["timm.layers"] = timm, layers
    memory = importlib.import_module("sam3.model.memory")
    position = importlib.import_module("sam3.model.position_encoding")
    return memory, position
