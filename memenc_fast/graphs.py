"""Opt-in CUDA graphs for the fused forward (``MemoryEncoder.cuda_graphs = True``).

SAM 2's video predictor calls the memory encoder once per object (B=1), where launch overhead is
a large share of the time: replaying a captured graph removes it. A graph reads the parameters'
memory when it replays, so in-place weight updates reach it; one graph is captured per input
signature (shapes, dtypes, device, options, backend), structure and set of parameter addresses,
and a replaced parameter tensor (its address changes) or structure captures anew and drops the
graphs that read the old ones. The key holds torch's TF32 flags too (cuDNN's and cuBLAS's, which
the ops read when they launch), so a graph never keeps an old precision. Each graph keeps its own
memory pool, so only the ``MAX_GRAPHS`` most recently used are kept.

A graph's static inputs and output are shared by every call that replays it, from any thread or
stream; the lock orders the host only. So each use (copy the inputs in, replay, clone the
output) is ordered on the GPU after the previous one: it waits on the event the previous use
recorded after its clone, when that use ran on another stream (on the same stream, stream order
does it), then records its own. That costs an event record per call, and a wait where the
stream changes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Tuple

import torch

from .precision import tf32_flags
from .structure import Structure

__all__ = ["GraphCache"]

_WARMUP_CALLS = 2  # lets lazy work (Triton compilation, cuBLAS handles) happen before capture

MAX_GRAPHS = 8
"""Captured graphs kept per module (least recently used dropped first)."""


class _UseOrder:
    """Orders the uses of one captured graph on the GPU, whatever stream each runs on: ``begin``
    before a use touches the graph's buffers, ``end`` once it is done with them (after the
    output's clone), on the stream the use ran on."""

    __slots__ = ("_event", "_stream")

    def __init__(self) -> None:
        self._event: Any = None
        self._stream: Any = None

    def begin(self, stream: Any) -> None:
        """Makes ``stream`` wait for the previous use where that ran on another stream."""
        if self._stream is not None and self._stream != stream:
            stream.wait_event(self._event)

    def end(self, stream: Any) -> None:
        """Marks the end of the use on ``stream``: the next use elsewhere waits for it."""
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(stream)
        self._stream = stream

    def retire(self) -> None:
        """Waits on the host for the last use, before the graph's buffers go back to the allocator
        (a use on another stream may still read them)."""
        if self._event is not None:
            self._event.synchronize()


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    static_inputs: Tuple[torch.Tensor, torch.Tensor]
    static_output: torch.Tensor
    structure: Structure  # keeps the structure (and so its id) and the parameters it read alive
    order: _UseOrder = field(default_factory=_UseOrder)


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
            for entry in self._entries.values():
                entry.order.retire()
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
        """``forward(pix_feat, masks)`` through a graph captured for ``signature``, torch's TF32
        flags, ``structure`` and the current addresses of its parameters, on the current stream.

        Returns a fresh tensor (the graph's output buffer is reused by the next replay).
        """
        weights = (id(structure), tuple(map(torch.Tensor.data_ptr, structure.parameters())))
        key = ((signature, tf32_flags()), weights)
        with self._lock, _on_device(masks.device):
            entry = self._entries.get(key)
            if entry is None:
                entry = self._capture(structure, forward, pix_feat, masks)
                # Graphs of replaced weights read freed memory if replayed: drop them. Only now,
                # after the capture synchronized the device, no use of theirs is still running.
                self._entries = OrderedDict((k, e) for k, e in self._entries.items() if k[1] == weights)
                self._entries[key] = entry
                while len(self._entries) > MAX_GRAPHS:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
            stream = torch.cuda.current_stream(masks.device)
            entry.order.begin(stream)
            entry.static_inputs[0].copy_(pix_feat)
            entry.static_inputs[1].copy_(masks)
            entry.graph.replay()
            out = entry.static_output.clone()
            entry.order.end(stream)
            return out

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
