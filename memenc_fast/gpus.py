"""The GPU generations SAM 2 users run, and the limits of the GPU a tensor is on.

Launch configurations are chosen from a ``GpuSpec`` (shared memory per block, SM count, L2 size,
what the tensor cores take): on a real device it is read once per device index from its properties; the
kernel report builds the same record for each target in ``TARGETS``, so it compiles exactly the
configuration that GPU would run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

__all__ = ["GpuSpec", "TARGETS", "REPORT_GPUS", "gpu_spec"]


@dataclass(frozen=True)
class GpuSpec:
    """What the launch configuration of a kernel depends on, for one GPU."""

    name: str
    capability: Tuple[int, int]
    sm_count: int
    shared_memory_per_block: int  # bytes a block may use, opt-in included
    l2_bytes: int = 4 * 2**20  # L2 cache; where unknown, the smallest generation's (T4)

    @property
    def arch(self) -> str:
        """``sm_86``; ``sm_90a``/``sm_100a`` where the arch-specific tensor cores (wgmma,
        tcgen05) need the ``a`` variant."""
        major, minor = self.capability
        return f"sm_{major}{minor}" + ("a" if major in (9, 10) else "")

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic and bf16 tensor cores (sm_80 and newer)."""
        return self.capability >= (8, 0)


# One GPU per generation; the SM counts are those the issue tracker's wave checks use.
_GENERATIONS: Dict[Tuple[int, int], GpuSpec] = {spec.capability: spec for spec in (
    GpuSpec("T4", (7, 5), 40, 65536, 4 * 2**20),
    GpuSpec("A100", (8, 0), 108, 166912, 40 * 2**20),
    GpuSpec("A10", (8, 6), 72, 101376, 6 * 2**20),
    GpuSpec("L4", (8, 9), 58, 101376, 48 * 2**20),
    GpuSpec("H100", (9, 0), 132, 232448, 50 * 2**20),
    GpuSpec("B200", (10, 0), 148, 232448, 126 * 2**20),
    GpuSpec("RTX 5090", (12, 0), 170, 101376, 96 * 2**20),
)}

TARGETS: Dict[str, GpuSpec] = {spec.arch: spec for spec in _GENERATIONS.values()}
"""Compile target -> the GPU the kernel report describes for it."""

REPORT_GPUS: Tuple[GpuSpec, ...] = tuple(_GENERATIONS.values()) + (
    GpuSpec("RTX 4090", (8, 9), 128, 101376, 72 * 2**20),)
"""Every GPU whose grid the kernel report counts in waves (sm_89 twice: L4 and RTX 4090)."""


@functools.lru_cache(maxsize=None)
def _spec_of_index(index: int) -> GpuSpec:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    # Older torch builds lack the opt-in limit: the generation's, else the default 48 KiB.
    known = _GENERATIONS.get(capability)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or (
        known.shared_memory_per_block if known else props.shared_memory_per_block)
    l2 = getattr(props, "L2_cache_size", 0) or (known.l2_bytes if known else GpuSpec.l2_bytes)
    return GpuSpec(props.name, capability, props.multi_processor_count, shared, l2)


def gpu_spec(device: torch.device) -> GpuSpec:
    """The limits of CUDA ``device`` (read once per device index)."""
    return _spec_of_index(device.index if device.index is not None else torch.cuda.current_device())
