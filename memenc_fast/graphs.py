"""Opt-in CUDA graphs for the fused forward (``MemoryEncoder.cuda_graphs = True``).

SAM 2's video predictor calls the memory encoder once per object (B=1), where launch overhead is
a large share of the time: replaying a captured graph removes it. A graph reads the parameters'
memory when it replays, so in-place weight updates reach it; one graph is captured per input
signature (shapes, dtypes, device, options, backend), structure and set of parameter addresses,
and a replaced parameter tensor (its address changes) or structure captures anew and drops the
graphs that read the old ones. Each graph keeps its own memory pool, so only the ``MAX_GRAPHS``
most recently used are kept.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Tuple

import torch

from .structure import Structure

__all__ = ["GraphCache"]

_WARMUP_CALLS = 2  # lets lazy work (Triton compilation, cuBLAS handles) happen before capture

MAX_GRAPHS = 8
"""Captured graphs kept per module (least recently used dropped first)."""


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    static_inputs: Tuple[torch.Tensor, torch.Tensor]
    static_output: torch.Tensor
    structure: Structure  # keeps the structure (and so its id) and the parameters it read alive


class GraphCache:
    """Captured forwards keyed by input signature, for one module."""

    def __init__(self) -> None:
        self._entries: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # graphs belong to one process and one set of buffers

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def run(
        self,
        signature: Hashable,
        structure: Structure,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        pix_feat: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """``forward(pix_feat, masks)`` through a graph captured for ``signature``, ``structure``
        and the current addresses of its parameters.

        Returns a fresh tensor (the graph's output buffer is reused by the next replay).
        """
        weights = (id(structure), tuple(map(torch.Tensor.data_ptr, structure.parameters())))
        key = (signature, weights)
        with self._lock, _on_device(masks.device):
            entry = self._entries.get(key)
            if entry is None:
                # Graphs of replaced weights read freed memory if replayed: drop them.
                self._entries = OrderedDict((k, e) for k, e in self._entries.items() if k[1] == weights)
                entry = self._capture(structure, forward, pix_feat, masks)
                self._entries[key] = entry
                while len(self._entries) > MAX_GRAPHS:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
            entry.static_inputs[0].copy_(pix_feat)
            entry.static_inputs[1].copy_(masks)
            entry.graph.replay()
            return entry.static_output.clone()

    @staticmethod
    def _capture(structure: Structure, forward, pix_feat: torch.Tensor, masks: torch.Tensor) -> _Captured:
        static_pix, static_masks = pix_feat.clone(), masks.clone()
        side = torch.cuda.Stream(device=masks.device)
        side.wait_stream(torch.cuda.current_stream(masks.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_CALLS):
                forward(static_pix, static_masks)
        torch.cuda.current_stream(masks.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = forward(static_pix, static_masks)
        return _Captured(graph, (static_pix, static_masks), static_output, structure)


def _on_device(device: torch.device):
    """``device`` made current: a graph is captured and replayed on the current device's streams."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
