"""``python -m memenc_fast check``: every available backend against the float64 reference."""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch

from ..dispatch import available_backends, use_backend
from ..numerics import judge
from .presets import PRESETS, build_encoder, make_inputs
from .reporting import (Column, backend_list, default_device, dtype_list, dtype_name, exit_status, writable_file,
                        positive_int, print_table, progress, torch_device, write_json)

__all__ = ["add_arguments", "run", "check_backends", "CHECK_COLUMNS"]

CHECK_COLUMNS = [
    Column("backend", "backend"),
    Column("dtype", "dtype"),
    Column("B", "batch", "{:d}"),
    Column("rel err", "rel_error", "{:.2e}"),
    Column("bound", "bound", "{:.2e}"),
    Column("ref same dtype", "reference_same_dtype_error", "{:.2e}"),
    Column("result", "status"),
]
"""The check table: relative errors (the backend's, the bound it must stay under, the reference's own
in the same dtype) all in one scientific format."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the ``check`` subcommand's options on ``parser``."""
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--dtypes", type=dtype_list, default=None,
                        help="comma list of fp32,bf16,fp16,fp64 (default: fp32,bf16,fp16 on GPU, fp32,bf16 on CPU)")
    parser.add_argument("--batch", type=positive_int, default=2, help="batch size (default 2)")
    parser.add_argument("--preset", default="sam2", choices=sorted(PRESETS), help="model/input size (default sam2)")
    parser.add_argument("--backends", type=backend_list, default=None,
                        help="comma list (default: every backend available on the device)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", type=writable_file, default=None,
                        help="write the results as JSON here")


def check_backends(device: torch.device, dtypes: List[torch.dtype], batch: int, preset_name: str,
                   backends: List[str]) -> List[Dict[str, object]]:
    """Runs each backend in each dtype and judges it against the float64 reference."""
    preset = PRESETS[preset_name]
    pix_feat, masks = make_inputs(preset, batch, seed=1, device=device, dtype=torch.float64)
    oracle_encoder = build_encoder(preset, seed=0, dtype=torch.float64, device=device)
    with torch.no_grad(), use_backend("reference"):
        oracle = oracle_encoder(pix_feat, masks)["vision_features"]
    rows: List[Dict[str, object]] = []
    steps = [(dtype, backend) for dtype in dtypes for backend in backends]
    for index, (dtype, backend) in enumerate(steps, 1):
        progress(f"[check {index}/{len(steps)}] {backend} {dtype_name(dtype)} B={batch} {preset_name}")
        encoder = build_encoder(preset, seed=0, dtype=dtype, device=device)
        inputs = (pix_feat.to(dtype), masks.to(dtype))
        row: Dict[str, object] = dict(backend=backend, dtype=dtype_name(dtype), batch=batch, preset=preset_name,
                                      device=str(device))
        try:
            with torch.no_grad():
                with use_backend("reference"):
                    same = encoder(*inputs)["vision_features"] if dtype in (torch.float16, torch.bfloat16) else None
                with use_backend(backend):
                    out = encoder(*inputs)["vision_features"]
            verdict = judge(out, oracle, dtype, device.type, same_dtype_ref=same)
            row.update(rel_error=verdict.error, bound=verdict.bound,
                       reference_same_dtype_error=verdict.same_dtype_reference_error,
                       status="PASS" if verdict.passed else "FAIL")
        except Exception as err:  # a crash is a failed check, reported in the table
            row.update(rel_error=None, bound=None, reference_same_dtype_error=None,
                       status=f"ERROR: {type(err).__name__}: {err}")
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    """Runs ``check`` with parsed, validated arguments; 1 when a check fails, else 0."""
    device = args.device or default_device()
    dtypes = args.dtypes or [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    backends = args.backends or available_backends(device)
    rows = check_backends(device, dtypes, args.batch, args.preset, backends)
    print_table(rows, CHECK_COLUMNS, title=f"memenc_fast check on {device} ({args.preset}, vs float64 reference)")
    write_json(args.json_path, {"device": str(device), "rows": rows})
    return exit_status(rows, "checks")
