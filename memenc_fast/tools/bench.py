"""``python -m memenc_fast bench``: the reference (eager and torch.compile) against every backend.

GPU timings use CUDA events around repeated calls after warm-up (``triton.testing.do_bench``
when triton is installed) and report the median; CPU timings use ``time.perf_counter``.
``--ops`` times each op of each backend alone, beside its floor on this device: the larger of
FLOPs / measured matmul rate and minimum bytes / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch

from .. import reference
from ..backends import triton_interpreted
from ..dispatch import Selection, available_backends, select_backend, use_backend
from ..structure import Structure, read_structure
from .presets import PRESETS, Preset, build_encoder, encoder_flops, flop_breakdown, make_inputs
from .reporting import dtype_name, parse_dtypes, parse_ints, print_table, progress

__all__ = ["add_arguments", "run", "time_callable", "measure_matmul_tflops", "measure_copy_bandwidth", "op_calls"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--batch", default=None,
                        help="comma list of batch sizes (default on GPU: sam2 1,8,32,64, sam3 1,16,64; CPU: 1,4)")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32,bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--preset", default="sam2",
                        help=f"comma list of model/input sizes from {sorted(PRESETS)} (default sam2)")
    parser.add_argument("--backends", default=None, help="comma list of backends (default: every available one)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time the reference under torch.compile (default: on GPU only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 50 GPU, 3 CPU)")
    parser.add_argument("--ops", action="store_true", help="time each op of each backend beside its floor")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows as JSON here")
    parser.add_argument("--plot", dest="plot_path", default=None, help="write a PNG plot here (needs matplotlib)")


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


def _end_to_end_rows(args: argparse.Namespace, device: torch.device, preset: Preset, dtypes, batches,
                     backends: List[str], repeats: int, do_compile: bool) -> List[Dict[str, object]]:
    peak = measure_matmul_tflops(device, torch.bfloat16) if device.type == "cuda" else None
    rows: List[Dict[str, object]] = []
    plan = [(dtype, batch) for dtype in dtypes for batch in batches]
    for index, (dtype, batch) in enumerate(plan, 1):
        encoder = build_encoder(preset, dtype=dtype, device=device)
        twin = _reference_twin(preset, encoder, dtype, device)
        pix_feat, masks = make_inputs(preset, batch, dtype=dtype, device=device)
        impls: Dict[str, Callable[[], object]] = {"reference": lambda: twin(pix_feat, masks)}
        if do_compile:
            compiled = torch.compile(twin, mode=args.compile_mode)
            impls["reference+compile"] = lambda: compiled(pix_feat, masks)
        for name in backends:
            impls[name] = (lambda n: lambda: _with_backend(n, encoder, pix_feat, masks))(name)
        flops = encoder_flops(preset, batch)
        timings: Dict[str, Optional[float]] = {}
        for name, fn in impls.items():
            progress(f"[bench {index}/{len(plan)}] {name} {dtype_name(dtype)} B={batch} {preset.name}")
            try:
                with torch.no_grad():
                    timings[name] = time_callable(fn, device, repeats)
            except Exception as err:  # one broken implementation must not hide the others' numbers
                progress(f"  {name} failed: {type(err).__name__}: {err}")
                timings[name] = None
        eager, compiled_time = timings.get("reference"), timings.get("reference+compile")
        for name, seconds in timings.items():
            row: Dict[str, object] = dict(preset=preset.name, dtype=dtype_name(dtype), batch=batch, impl=name,
                                          ms=None, us_per_object=None, vs_eager=None, vs_compile=None,
                                          tflops=None, pct_peak=None, device=str(device))
            if seconds is not None:
                row.update(ms=seconds * 1e3, us_per_object=seconds * 1e6 / batch,
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


def _op_rows(device: torch.device, preset: Preset, dtypes, batches, backends: List[str],
             repeats: int) -> List[Dict[str, object]]:
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
                        progress(f"[ops] {name} {op} {dtype_name(dtype)} B={batch}")
                        seconds = time_callable(fn, device, repeats)
                        cost = costs[op]
                        floor = max(cost["flops"] / rate, cost["bytes"] / bandwidth)
                        rows.append(dict(preset=preset.name, backend=name, op=op, dtype=dtype_name(dtype),
                                         batch=batch,
                                         us=seconds * 1e6, floor_us=floor * 1e6, pct_of_floor=100 * floor / seconds,
                                         gflop=cost["flops"] / 1e9, mbytes=cost["bytes"] / 1e6, device=str(device)))
    return rows


def _plot(rows: List[Dict[str, object]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("--plot needs matplotlib (pip install matplotlib); no plot written")
        return
    dtypes = sorted({str(r["dtype"]) for r in rows})
    presets = sorted({str(r["preset"]) for r in rows})
    panels = [(p, d) for p in presets for d in dtypes]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (preset, dtype) in zip(axes[0], panels):
        subset = [r for r in rows if r["dtype"] == dtype and r["preset"] == preset and r["us_per_object"]]
        for impl in sorted({str(r["impl"]) for r in subset}):
            points = sorted((r["batch"], r["us_per_object"]) for r in subset if r["impl"] == impl)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch (objects)", ylabel="µs per object",
               title=f"{preset} {dtype} ({rows[0]['device']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    progress(f"plot written to {path}")


GPU_BATCHES = {"sam2": "1,8,32,64", "sam3": "1,16,64"}


def _default_batches(preset: str, on_gpu: bool) -> str:
    return GPU_BATCHES.get(preset, "1,8") if on_gpu else "1,4"


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    try:
        unknown = [p for p in presets if p not in PRESETS]
        if unknown or not presets:
            raise ValueError(f"--preset must be a comma list of {sorted(PRESETS)}; got {args.preset!r}")
        batches = {p: parse_ints(args.batch or _default_batches(p, on_gpu)) for p in presets}
        dtypes = parse_dtypes(args.dtypes or ("fp32,bf16" if on_gpu else "fp32"))
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    if args.backends:
        backends = args.backends.split(",")
    else:
        # The interpreted Triton backend is a correctness tool: timing it says nothing.
        backends = [b for b in available_backends(device)
                    if b != "reference" and not (b == "triton" and not on_gpu and triton_interpreted())]
    repeats = args.repeats or (50 if on_gpu else 3)
    rows = []
    if args.ops:
        for name in presets:
            rows += _op_rows(device, PRESETS[name], dtypes, batches[name], backends, repeats)
        print_table(rows, [("preset", "preset"), ("backend", "backend"), ("op", "op"), ("dtype", "dtype"),
                           ("B", "batch"), ("µs", "us"), ("floor µs", "floor_us"), ("% of floor", "pct_of_floor"),
                           ("GFLOP", "gflop"), ("MB", "mbytes")],
                    title=f"memenc_fast per-op timings on {device}")
    else:
        do_compile = on_gpu if args.compile is None else args.compile
        for name in presets:
            rows += _end_to_end_rows(args, device, PRESETS[name], dtypes, batches[name], backends, repeats,
                                     do_compile)
        columns = [("preset", "preset"), ("dtype", "dtype"), ("B", "batch"), ("impl", "impl"),
                   ("ms/forward", "ms"), ("µs/object", "us_per_object"), ("vs eager", "vs_eager"),
                   ("vs compile", "vs_compile")]
        if on_gpu:
            columns += [("TFLOP/s", "tflops"), ("% bf16 peak", "pct_peak")]
        print_table(rows, columns, title=f"memenc_fast bench on {device}")
        if args.plot_path:
            _plot(rows, args.plot_path)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0
