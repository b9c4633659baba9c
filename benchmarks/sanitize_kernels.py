"""Every kernel of the ``triton`` and ``cuda`` backends, in each configuration family, launched once
at small shapes: the program the GPU campaign runs under compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py

A case is a geometry and a precision; each backend runs one forward of a SAM 2 memory encoder per
case. The geometries make the launch planners pick their different families (on an H100):

- ``small``: 128² masks, 8² features, B=1: one MLP token tile, split across the hidden; the
  smallest mask-path and dwconv tiles, fewer tiles than SMs.
- ``edge``: 144² masks, 9² features, B=3: every tile has masked rows and columns, the last MLP
  token tile is partial.
- ``wave``: 512² masks, 32² features, B=9: 144 MLP token tiles, a whole wave (no split); the
  persistent mask path runs more tiles than it has programs.

The precisions: ``fp32`` (IEEE dots, 3xTF32 in the CUDA kernels), ``fp32-tf32`` (torch's TF32
flags on), ``bf16``, ``fp16``, and ``bf16-autocast`` (an fp32 module under bf16 autocast: kernels
that read fp32 weights). Each backend also replays one CUDA graph of its forward, except where
``PYTORCH_NO_CUDA_MEMORY_CACHING`` is set (memcheck's setting: graph capture needs torch's caching
allocator).

Every output is judged against the float64 reference (``memenc_fast.numerics``), and the
kernels each forward launched are listed (name and configuration, as the launch planners describe
them), so that a clean sanitizer report is known to cover them. Exit status 1 when a forward
raised, failed its check or launched none of its backend's kernels (the torch ops ran instead).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from unittest import mock

import torch

from memenc_fast import use_backend
from memenc_fast.backends.cuda import library
from memenc_fast.gpus import gpu_spec
from memenc_fast.numerics import judge
from memenc_fast.tools.presets import PRESETS, Preset, build_encoder, make_inputs
from memenc_fast.tools.reporting import Column, exit_status, print_table, progress, torch_device, writable_file, write_json

GEOMETRIES: Dict[str, Tuple[Preset, int]] = {
    "small": (PRESETS["small"], 1),
    "edge": (Preset("edge", mask_size=144, feature_size=9), 3),
    "wave": (PRESETS["sam2_512"], 9),
}
"""name -> (encoder and input size, batch)."""


@dataclass(frozen=True)
class Precision:
    """The module's and inputs' dtype, autocast's dtype (None: no autocast) and torch's TF32 flags."""

    dtype: torch.dtype
    autocast: Optional[torch.dtype] = None
    tf32: bool = False

    @property
    def compute(self) -> torch.dtype:
        """The dtype the kernels compute in."""
        return self.autocast or self.dtype

    @contextlib.contextmanager
    def applied(self, device: torch.device) -> Iterator[None]:
        """TF32 flags (both, as each op obeys one of them) and autocast as this precision sets them."""
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        autocast = (torch.autocast(device.type, dtype=self.autocast) if self.autocast is not None
                    else contextlib.nullcontext())
        try:
            with autocast:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


PRECISIONS: Dict[str, Precision] = {
    "fp32": Precision(torch.float32),
    "fp32-tf32": Precision(torch.float32, tf32=True),
    "bf16": Precision(torch.bfloat16),
    "fp16": Precision(torch.float16),
    "bf16-autocast": Precision(torch.float32, autocast=torch.bfloat16),
}

BACKENDS = ("triton", "cuda")

COLUMNS = [Column("geometry", "geometry"), Column("B", "batch", "{:d}"), Column("precision", "precision"),
           Column("backend", "backend"), Column("graph", "graph"), Column("rel err", "rel_error", "{:.2e}"),
           Column("bound", "bound", "{:.2e}"), Column("launches", "launches", "{:d}"), Column("result", "status")]


class LaunchLog:
    """The kernel launches of both backends while :meth:`recording`, as (backend, kernel, configuration)."""

    def __init__(self) -> None:
        self.launches: List[Tuple[str, str, str]] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Wraps the two launch points: a Triton ``Launch.run`` (where triton is installed) and the
        CUDA library's launcher call, whose configuration its own planner reports for the same
        arguments."""
        log = self.launches
        run_cuda = library.CudaLibrary.launch

        def cuda_launch(lib: library.CudaLibrary, op: str, args: ctypes.Structure, device_index: int,
                        stream: Optional[int]) -> None:
            log.append(("cuda", *_cuda_plan(lib, op, args, device_index)))
            run_cuda(lib, op, args, device_index, stream)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(library.CudaLibrary, "launch", cuda_launch))
            try:
                from memenc_fast.kernels._common import Launch
            except ImportError:  # no triton: its backend is unavailable, and its cases say so
                Launch = None
            if Launch is not None:
                run_triton = Launch.run

                def triton_launch(launch: Launch) -> None:
                    log.append(("triton", launch.kernel, launch.config))
                    run_triton(launch)

                stack.enter_context(mock.patch.object(Launch, "run", triton_launch))
            yield


def _cuda_plan(lib: library.CudaLibrary, op: str, args: ctypes.Structure, device_index: int) -> Tuple[str, str]:
    """(kernel, configuration) the CUDA launcher ``op`` picks for ``args``, from its planner; the op's
    name where it cannot say (a host build)."""
    if lib.runs_on_host:
        return op, "host build"
    fields = {name: getattr(args, name) for name, *_ in args._fields_}
    try:
        planned = lib.plan(op, gpu_spec(torch.device("cuda", device_index)), **fields)
    except Exception as err:  # the launch itself reports what matters; this is only its label
        return op, f"plan unavailable: {type(err).__name__}: {err}"
    return planned.kernel, planned.config


def run_geometry(geometry: str, precisions: List[str], backends: List[str], device: torch.device, graphs: bool,
                 log: LaunchLog) -> List[Dict[str, object]]:
    """One forward per backend and precision (and one graph replay each, with ``graphs``) at
    ``geometry``, judged against the float64 reference; one row each."""
    preset, batch = GEOMETRIES[geometry]
    pix64, masks64 = make_inputs(preset, batch, seed=1, dtype=torch.float64, device=device)
    with torch.no_grad(), use_backend("reference"):
        oracle = build_encoder(preset, dtype=torch.float64, device=device)(pix64, masks64)["vision_features"]
    rows = []
    for name in precisions:
        precision = PRECISIONS[name]
        inputs = (pix64.to(precision.dtype), masks64.to(precision.dtype))
        modules = {"no": build_encoder(preset, dtype=precision.dtype, device=device)}
        if graphs:
            modules["yes"] = build_encoder(preset, dtype=precision.dtype, device=device)
            modules["yes"].cuda_graphs = True
        same_dtype = None
        if precision.compute in (torch.float16, torch.bfloat16):
            with torch.no_grad(), precision.applied(device), use_backend("reference"):
                same_dtype = modules["no"](*inputs)["vision_features"]
        for backend in backends:
            for graph, module in modules.items():
                progress(f"[sanitize] {geometry} B={batch} {name} {backend}{' graph' if graph == 'yes' else ''}")
                row: Dict[str, object] = dict(geometry=geometry, batch=batch, precision=name, backend=backend,
                                              graph=graph)
                start = len(log.launches)
                try:
                    with torch.no_grad(), precision.applied(device), use_backend(backend):
                        # A graph is captured on the first call and replayed on the second.
                        for _ in range(2 if module.cuda_graphs else 1):
                            out = module(*inputs)["vision_features"]
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # an asynchronous fault belongs to this case
                    verdict = judge(out, oracle, precision.compute, device.type, same_dtype_ref=same_dtype,
                                    allow_tf32=precision.tf32 if precision.compute == torch.float32 else None)
                    ours = [entry for entry in log.launches[start:] if entry[0] == backend]
                    row.update(rel_error=verdict.error, bound=verdict.bound, launches=len(ours),
                               kernels=sorted({f"{kernel} [{config}]" for _, kernel, config in ours}),
                               fallbacks=module.last_backend_reason)
                    if not ours:
                        row["status"] = f"FAIL: no {backend} kernel launched ({module.last_backend_reason})"
                    else:
                        row["status"] = "PASS" if verdict.passed else "FAIL"
                except Exception as err:  # one broken case must not hide the others
                    row.update(rel_error=None, bound=None, launches=len(log.launches) - start,
                               status=f"ERROR: {type(err).__name__}: {err}")
                rows.append(row)
    return rows


def _names(allowed: Dict[str, object], what: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what} from {', '.join(allowed)}; got {text!r}")
        return names
    return parse


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the cases, prints their table and every kernel configuration launched; 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=torch_device, default=None, help="torch device (default cuda)")
    parser.add_argument("--backends", type=_names(dict.fromkeys(BACKENDS), "backends"), default=list(BACKENDS),
                        help=f"comma list from {', '.join(BACKENDS)} (default both)")
    parser.add_argument("--geometries", type=_names(GEOMETRIES, "geometries"), default=list(GEOMETRIES),
                        help=f"comma list from {', '.join(GEOMETRIES)} (default all)")
    parser.add_argument("--precisions", type=_names(PRECISIONS, "precisions"), default=list(PRECISIONS),
                        help=f"comma list from {', '.join(PRECISIONS)} (default all)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", type=writable_file, default=None,
                        help="write the rows and the launched configurations as JSON here")
    args = parser.parse_args(argv)
    device = args.device or torch.device("cuda")
    graphs = device.type == "cuda" and not os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING")
    log = LaunchLog()
    rows: List[Dict[str, object]] = []
    with log.recording():
        for geometry in args.geometries:
            rows += run_geometry(geometry, args.precisions, args.backends, device, graphs, log)
    print_table(rows, COLUMNS, title=f"sanitize_kernels on {device}")
    families = Counter(log.launches)
    print(f"\n{len(families)} kernel configurations launched (launches):")
    for (backend, kernel, config), count in sorted(families.items()):
        print(f"  {backend:<7} {kernel} [{config}] x{count}")
    write_json(args.json_path, {"device": str(device), "rows": rows,
                                "configurations": [dict(backend=b, kernel=k, config=c, launches=n)
                                                   for (b, k, c), n in sorted(families.items())]})
    return exit_status(rows, "cases")


if __name__ == "__main__":
    sys.exit(main())
