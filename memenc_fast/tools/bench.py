"""``python -m memenc_fast bench``: the reference (eager and torch.compile) against every backend.

GPU timings use CUDA events around repeated calls after warm-up (``triton.testing.do_bench``
when triton is installed) and report the median; CPU timings use ``time.perf_counter``.
``--ops`` times each op of each backend alone, beside its floor on this device: the larger of
FLOPs / measured matmul rate and minimum bytes / measured copy bandwidth. The triton ``cxblock``
is timed again with its MLP's hidden split across each of ``MLP_SPLITS`` programs per token tile
(rows ``cxblock split=N``, through ``memenc_fast.kernels.cxblock.forced_mlp_split``), beside the
split the cost model chose (the ``cxblock`` row): what a GPU says of that choice.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Mapping, Optional

import torch

from .. import reference
from ..backends import triton_interpreted
from ..dispatch import REFERENCE, Selection, available_backends, select_backend, use_backend
from ..structure import Structure, read_structure
from .presets import PRESETS, Preset, build_encoder, encoder_flops, flop_breakdown, make_inputs
from .reporting import (Column, backend_list, batch_sizes, default_device, dtype_list, dtype_name, writable_file,
                        plot_file, positive_int, preset_list, print_table, progress, torch_device, write_json)

__all__ = ["add_arguments", "run", "time_callable", "measure_matmul_tflops", "measure_copy_bandwidth", "op_calls",
           "end_to_end_columns", "OPS_COLUMNS", "COMPILE_MODES"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The modes ``torch.compile`` takes."""

EAGER, COMPILED = "reference", "reference+compile"
"""The rows of the reference model itself, eager and under torch.compile."""

MLP_SPLITS = (1, 2, 4)
"""The MLP splits ``--ops`` also times the triton ``cxblock`` with."""

GPU_BATCHES = {"sam2": [1, 8, 32, 64], "sam3": [1, 16, 64]}
OTHER_GPU_BATCHES, CPU_BATCHES = [1, 8], [1, 4]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the ``bench`` subcommand's options on ``parser``."""
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--batch", type=batch_sizes, default=None,
                        help="comma list of batch sizes (default on GPU: sam2 1,8,32,64, sam3 1,16,64; CPU: 1,4)")
    parser.add_argument("--dtypes", type=dtype_list, default=None,
                        help="comma list of fp32,bf16,fp16,fp64 (default fp32,bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--preset", type=preset_list, default="sam2",
                        help=f"comma list of model/input sizes from {', '.join(sorted(PRESETS))} (default sam2)")
    parser.add_argument("--backends", type=backend_list, default=None,
                        help="comma list of backends (default: every available one)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time the reference under torch.compile (default: on GPU only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--compile-mode", default="max-autotune", choices=COMPILE_MODES,
                        help="torch.compile mode (default max-autotune)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repetitions (default 50 GPU, 3 CPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time each backend with cuda_graphs = True (rows <backend>+graphs; CUDA only)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", type=writable_file, default=None,
                        help="write the rows as JSON here")
    # The plot draws end-to-end speedups, which --ops does not measure.
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("--ops", action="store_true", help="time each op of each backend beside its floor")
    exclusive.add_argument("--plot", dest="plot_path", metavar="FILE.png", type=plot_file, default=None,
                           help="write a plot of the speedups here (needs matplotlib)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` on ``device`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return do_bench(fn, warmup=25, rep=max(25, repeats), return_mode="median") / 1e3
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def time_side_by_side(impls: Dict[str, Callable[[], object]], device: torch.device,
                      repeats: int) -> Dict[str, Optional[float]]:
    """Median seconds per call of each implementation (None where it failed, said on stderr).

    On the CPU the calls are interleaved, one of each per round, so that a machine whose speed
    drifts (other processes, clocks) weighs on every implementation alike; GPU timings, from
    CUDA events, are taken one implementation at a time.
    """
    timings: Dict[str, Optional[float]] = {}
    working: Dict[str, Callable[[], object]] = {}
    for name, fn in impls.items():
        try:
            if device.type == "cuda":
                timings[name] = time_callable(fn, device, repeats)
            else:
                for _ in range(2):  # warm-up
                    fn()
                working[name] = fn
        except Exception as err:  # one broken implementation must not hide the others' numbers
            progress(f"  {name} failed: {type(err).__name__}: {err}")
            timings[name] = None
    rounds: Dict[str, List[float]] = {name: [] for name in working}
    for _ in range(repeats):
        for name, fn in working.items():
            begin = time.perf_counter()
            fn()
            rounds[name].append(time.perf_counter() - begin)
    timings.update({name: statistics.median(times) for name, times in rounds.items()})
    return {name: timings[name] for name in impls}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate this device reaches in ``dtype`` (8192^3 on GPU, 2048^3 on CPU), TFLOP/s."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_callable(lambda: a @ b, device, repeats=20 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(numel, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = time_callable(lambda: dst.copy_(src), device, repeats=20 if device.type == "cuda" else 3)
    return 2 * numel / seconds


def _reference_twin(preset: Preset, encoder: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    twin = build_encoder(preset, namespace=reference, dtype=dtype, device=device)
    twin.load_state_dict(encoder.state_dict())
    return twin


def _end_to_end_rows(device: torch.device, preset: Preset, dtypes: List[torch.dtype], batches: List[int],
                     backends: List[str], repeats: int, compile_mode: Optional[str],
                     cuda_graphs: bool = False) -> List[Dict[str, object]]:
    """One row per (dtype, batch, implementation): the eager reference, the compiled one when
    ``compile_mode`` is given, and each backend, also replaying CUDA graphs with ``cuda_graphs``
    (``<backend>+graphs``); speedups are against the first two."""
    peak = measure_matmul_tflops(device, torch.bfloat16) if device.type == "cuda" else None
    rows: List[Dict[str, object]] = []
    plan = [(dtype, batch) for dtype in dtypes for batch in batches]
    for index, (dtype, batch) in enumerate(plan, 1):
        encoder = build_encoder(preset, dtype=dtype, device=device)
        twin = _reference_twin(preset, encoder, dtype, device)
        pix_feat, masks = make_inputs(preset, batch, dtype=dtype, device=device)
        impls: Dict[str, Callable[[], object]] = {EAGER: lambda: twin(pix_feat, masks)}
        if compile_mode is not None:
            compiled = torch.compile(twin, mode=compile_mode)
            impls[COMPILED] = lambda: compiled(pix_feat, masks)
        for name in backends:
            impls[name] = (lambda n: lambda: _with_backend(n, encoder, pix_feat, masks))(name)
        if cuda_graphs:
            graphed = build_encoder(preset, dtype=dtype, device=device)  # the same seeded weights
            graphed.cuda_graphs = True
            for name in backends:
                impls[f"{name}+graphs"] = (lambda n: lambda: _with_backend(n, graphed, pix_feat, masks))(name)
        flops = encoder_flops(preset, batch)
        progress(f"[bench {index}/{len(plan)}] {', '.join(impls)} {dtype_name(dtype)} B={batch} {preset.name}")
        with torch.no_grad():
            timings = time_side_by_side(impls, device, repeats)
        eager, compiled_time = timings.get(EAGER), timings.get(COMPILED)
        for name, seconds in timings.items():
            row: Dict[str, object] = dict(preset=preset.name, dtype=dtype_name(dtype), batch=batch, impl=name,
                                          ms=None, objects_per_s=None, vs_eager=None, vs_compile=None,
                                          tflops=None, pct_peak=None, device=str(device))
            if seconds is not None:
                row.update(ms=seconds * 1e3, objects_per_s=batch / seconds,
                           vs_eager=eager / seconds if eager else None,
                           vs_compile=compiled_time / seconds if compiled_time else None)
                if device.type == "cuda":
                    row["tflops"] = flops / seconds / 1e12
                    row["pct_peak"] = 100 * row["tflops"] / peak if peak else None
            rows.append(row)
    return rows


def _with_backend(name: str, encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor):
    with use_backend(name):
        return encoder(pix_feat, masks)


def _op_costs(preset: Preset, batch: int, itemsize: int) -> Dict[str, Dict[str, int]]:
    """FLOPs and minimum bytes (inputs read once, outputs written once, weights once) per op."""
    flops = flop_breakdown(preset, batch)
    tokens = batch * preset.feature_size**2
    c, hidden, out = preset.in_dim, 4 * preset.in_dim, preset.out_dim
    mask_bytes = batch * preset.mask_size**2 + tokens * c
    return {
        "mask_downsample": dict(flops=flops["mask_downsample"], bytes=mask_bytes * itemsize),
        "proj_add": dict(flops=flops["proj_add"], bytes=(3 * tokens * c + 2 * c * c) * itemsize),
        "cxblock": dict(flops=flops["cxblock"], bytes=(2 * tokens * c + 2 * c * hidden + 49 * c) * itemsize),
        "out_proj": dict(flops=flops["out_proj"], bytes=(tokens * (c + out) + c * out) * itemsize),
    }


def op_calls(ops: Mapping[str, Callable], structure: Structure, pix_feat: torch.Tensor,
             masks: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """One zero-argument call per op on the module's live weights, each on the previous op's real
    output (computed here once)."""
    stages, size = structure.stages, structure.interpol_size()

    def mask_downsample() -> torch.Tensor:
        return ops["mask_downsample"](masks, stages, size, True)

    mask_features = mask_downsample()
    tokens = ops["proj_add"](mask_features, pix_feat, structure.projection)
    return {
        "mask_downsample": mask_downsample,
        "proj_add": lambda: ops["proj_add"](mask_features, pix_feat, structure.projection),
        "cxblock": lambda: ops["cxblock"](tokens, structure.blocks[0]),
        "out_proj": lambda: ops["out_proj"](tokens, structure.out_projection),
    }


def _op_settings(backend: str, op: str) -> Dict[str, Callable[[], ContextManager[object]]]:
    """The rows of one op: its own, and for the triton ``cxblock`` one per forced MLP split."""
    settings: Dict[str, Callable[[], ContextManager[object]]] = {op: contextlib.nullcontext}
    if backend == "triton" and op == "cxblock":
        from ..kernels.cxblock import forced_mlp_split

        settings.update({f"cxblock split={split}": functools.partial(forced_mlp_split, split) for split in MLP_SPLITS})
    return settings


def _op_rows(device: torch.device, preset: Preset, dtypes: List[torch.dtype], batches: List[int],
             backends: List[str], repeats: int) -> List[Dict[str, object]]:
    bandwidth = measure_copy_bandwidth(device)
    rows: List[Dict[str, object]] = []
    for dtype in dtypes:
        rate = measure_matmul_tflops(device, dtype) * 1e12
        encoder = build_encoder(preset, dtype=dtype, device=device)
        structure = read_structure(encoder)
        for batch in batches:
            pix_feat, masks = make_inputs(preset, batch, dtype=dtype, device=device)
            costs = _op_costs(preset, batch, torch.finfo(dtype).bits // 8)
            for name in backends:
                selection: Selection = select_backend(device, dtype, structure, None, False, name=name)
                if selection.is_reference:
                    continue
                with torch.no_grad():
                    for op, fn in op_calls(selection.ops, structure, pix_feat, masks).items():
                        cost = costs[op]
                        floor = max(cost["flops"] / rate, cost["bytes"] / bandwidth)
                        for row_op, setting in _op_settings(name, op).items():
                            progress(f"[ops] {name} {row_op} {dtype_name(dtype)} B={batch}")
                            with setting():
                                seconds = time_callable(fn, device, repeats)
                            rows.append(dict(preset=preset.name, backend=name, op=row_op, dtype=dtype_name(dtype),
                                             batch=batch, us=seconds * 1e6, floor_us=floor * 1e6,
                                             pct_of_floor=100 * floor / seconds, gflop=cost["flops"] / 1e9,
                                             mbytes=cost["bytes"] / 1e6, device=str(device)))
    return rows


def _plot(rows: List[Dict[str, object]], path: Path, device: torch.device) -> None:
    """Writes the speedups to ``path``: one panel per preset (rows) and dtype (columns), each
    implementation against the eager reference (solid) and the compiled one (dashed, when timed),
    batch sizes side by side with the eager reference's time under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    presets = list(dict.fromkeys(str(r["preset"]) for r in rows))
    dtypes = list(dict.fromkeys(str(r["dtype"]) for r in rows))
    impls = [name for name in dict.fromkeys(str(r["impl"]) for r in rows) if name != EAGER]
    compiled = any(r["impl"] == COMPILED for r in rows)
    fig, axes = plt.subplots(len(presets), len(dtypes), figsize=(6 * len(dtypes), 4.5 * len(presets)),
                             squeeze=False)
    for (row_index, preset), (column_index, dtype) in ((p, d) for p in enumerate(presets) for d in enumerate(dtypes)):
        ax = axes[row_index][column_index]
        panel = {(r["impl"], r["batch"]): r for r in rows if r["preset"] == preset and r["dtype"] == dtype}
        batches = sorted({batch for _, batch in panel})
        # Batches as categories, evenly spaced: 1, 8, 32, 64 are sizes to compare, not a scale.
        positions = list(range(len(batches)))
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":", label="reference (1.0x)")
        for color, impl in enumerate(impls):
            for key, style, baseline in (("vs_eager", "-", "eager"), ("vs_compile", "--", "compiled")):
                if key == "vs_compile" and (not compiled or impl == COMPILED):
                    continue
                speedups = [panel.get((impl, b), {}).get(key) for b in batches]
                ax.plot(positions, [math.nan if s is None else s for s in speedups], linestyle=style,
                        marker="o", color=f"C{color}", label=f"{impl} vs {baseline}")
        eager_ms = [panel.get((EAGER, b), {}).get("ms") for b in batches]
        ax.set_xticks(positions, [f"{b}" if ms is None else f"{b}\n(eager {ms:,.2f} ms)"
                                  for b, ms in zip(batches, eager_ms)])
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}x"))
        ax.grid(axis="y", alpha=0.3)
        ax.set(xlabel="batch (objects)", ylabel="speedup (higher is faster)", title=f"{preset}, {dtype}")
    fig.suptitle(f"memenc_fast bench on {device}: speedup over the reference model")
    fig.tight_layout()
    # One legend for all panels, beside them: inside a panel it would cover the lines.
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    progress(f"plot written to {path}")


def end_to_end_columns(device: torch.device, compiled: bool) -> List[Column]:
    """The bench table's columns: time per forward, throughput, speedups (vs compiled only when it
    was timed) and, on GPU, the FLOP rate."""
    columns = [Column("preset", "preset"), Column("dtype", "dtype"), Column("B", "batch", "{:d}"),
               Column("impl", "impl"), Column("ms/forward", "ms", "{:,.3f}"),
               Column("objects/s", "objects_per_s", "{:,.1f}"), Column("vs eager", "vs_eager", "{:.2f}x")]
    if compiled:
        columns.append(Column("vs compiled", "vs_compile", "{:.2f}x"))
    if device.type == "cuda":
        columns += [Column("TFLOP/s", "tflops", "{:.1f}"), Column("% of bf16 peak", "pct_peak", "{:.1f}")]
    return columns


OPS_COLUMNS = [Column("preset", "preset"), Column("backend", "backend"), Column("op", "op"),
               Column("dtype", "dtype"), Column("B", "batch", "{:d}"), Column("µs", "us", "{:,.1f}"),
               Column("floor µs", "floor_us", "{:,.1f}"), Column("% of floor", "pct_of_floor", "{:.1f}"),
               Column("GFLOP", "gflop", "{:.3f}"), Column("MB", "mbytes", "{:.2f}")]
"""The ``--ops`` table: times in µs, one format per column."""


def _default_batches(preset: str, on_gpu: bool) -> List[int]:
    return GPU_BATCHES.get(preset, OTHER_GPU_BATCHES) if on_gpu else CPU_BATCHES


def run(args: argparse.Namespace) -> int:
    """Runs ``bench`` with parsed, validated arguments; returns 0."""
    device = args.device or default_device()
    on_gpu = device.type == "cuda"
    dtypes = args.dtypes or ([torch.float32, torch.bfloat16] if on_gpu else [torch.float32])
    if args.backends:
        # The eager reference is always timed, under its own row.
        backends = [b for b in args.backends if b != REFERENCE]
    else:
        # The interpreted Triton backend is a correctness tool: timing it says nothing.
        backends = [b for b in available_backends(device)
                    if b != REFERENCE and not (b == "triton" and not on_gpu and triton_interpreted())]
    repeats = args.repeats or (50 if on_gpu else 3)
    if args.cuda_graphs and (args.ops or not on_gpu):
        progress(f"bench: --cuda-graphs times whole forwards on a CUDA device; got {device}"
                 f"{' and --ops' if args.ops else ''}")
        return 2
    rows: List[Dict[str, object]] = []
    for name in args.preset:
        batches = args.batch or _default_batches(name, on_gpu)
        if args.ops:
            rows += _op_rows(device, PRESETS[name], dtypes, batches, backends, repeats)
        else:
            compile_mode = args.compile_mode if (on_gpu if args.compile is None else args.compile) else None
            rows += _end_to_end_rows(device, PRESETS[name], dtypes, batches, backends, repeats, compile_mode,
                                     args.cuda_graphs)
    if args.ops:
        print_table(rows, OPS_COLUMNS, title=f"memenc_fast per-op timings on {device}")
    else:
        compiled = any(r["impl"] == COMPILED for r in rows)
        print_table(rows, end_to_end_columns(device, compiled), title=f"memenc_fast bench on {device}")
        if args.plot_path:
            _plot(rows, args.plot_path, device)
    write_json(args.json_path, {"device": str(device), "torch": torch.__version__, "rows": rows})
    return 0
