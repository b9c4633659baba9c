"""``python -m memenc_fast check``: every available backend against the float64 reference."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch

from ..dispatch import available_backends, use_backend
from .numerics import judge
from .presets import PRESETS, build_encoder, make_inputs
from .reporting import dtype_name, parse_dtypes, print_table, progress

__all__ = ["add_arguments", "run", "check_backends"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all on GPU, fp32,bf16 on CPU)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--preset", default="sam2", choices=sorted(PRESETS), help="model/input size (default sam2)")
    parser.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")


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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = "fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16"
    dtypes = parse_dtypes(args.dtypes or default)
    backends = args.backends.split(",") if args.backends else available_backends(device)
    rows = check_backends(device, dtypes, args.batch, args.preset, backends)
    print_table(
        rows,
        [("backend", "backend"), ("dtype", "dtype"), ("B", "batch"), ("rel err", "rel_error"),
         ("bound", "bound"), ("ref same dtype", "reference_same_dtype_error"), ("result", "status")],
        title=f"memenc_fast check on {device} ({args.preset}, vs float64 reference)",
    )
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": str(device), "rows": rows}, handle, indent=2)
    failed = [r for r in rows if r["status"] != "PASS"]
    if failed:
        print(f"{len(failed)} of {len(rows)} checks failed", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks passed")
    return 0

