"""Per-frame time of SAM 2's video predictor with and without memenc-fast, by object count.

Runs examples/sam2_video_patch.py's comparison (seeded random sam2 weights, a synthetic video of
moving discs, one click per object, ``propagate_in_video``) for each object count, and prints
the time per frame of the whole predictor and of its memory encoder alone, as is and after
``patch_sam2``, with the two runs' mask agreement. Each timing is the fastest of ``--repeats``
runs (the first pays for compilation and autotuning). Needs sam2 installed.

    python benchmarks/bench_video.py --objects 1,8,32 --frames 8 --json video.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Dict, List

import torch

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "sam2_video_patch.py")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_example():
    """The example script as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("sam2_video_patch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(config: str, device: str, objects: List[int], frames: int, backend: str, image_size: int,
        autocast: str, repeats: int) -> List[Dict[str, object]]:
    """One row per object count: milliseconds per frame (predictor and memory encoder, as is and
    patched), the speedups and the lowest per-frame mask agreement."""
    example = load_example()
    rows = []
    for count in objects:
        result = example.compare(config, device, frames, count, backend, image_size,
                                 autocast=AUTOCAST[autocast], repeats=repeats)
        ms = {key: 1e3 * result[f"{key}_seconds"] for key in ("baseline", "patched", "baseline_encoder",
                                                              "patched_encoder")}
        rows.append(dict(objects=count, frames=frames, backend=result["patched_backend"],
                         sam2_ms_per_frame=ms["baseline"], patched_ms_per_frame=ms["patched"],
                         speedup=ms["baseline"] / ms["patched"],
                         sam2_encoder_ms_per_frame=ms["baseline_encoder"],
                         patched_encoder_ms_per_frame=ms["patched_encoder"],
                         encoder_speedup=ms["baseline_encoder"] / ms["patched_encoder"],
                         min_iou=min(result["ious"].values())))
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """The rows as a markdown table."""
    lines = ["| objects | backend | sam2 ms/frame | patched ms/frame | speedup | sam2 encoder ms/frame "
             "| patched encoder ms/frame | encoder speedup | min IoU |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['objects']} | {r['backend']} | {r['sam2_ms_per_frame']:.2f} | "
                     f"{r['patched_ms_per_frame']:.2f} | {r['speedup']:.2f}x | {r['sam2_encoder_ms_per_frame']:.3f} | "
                     f"{r['patched_encoder_ms_per_frame']:.3f} | {r['encoder_speedup']:.2f}x | {r['min_iou']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--objects", default="1,8,32", help="comma-separated object counts")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), default="bf16" if cuda else "none",
                        help="dtype of torch.autocast around tracking, as sam2's README runs it on a GPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    try:
        objects = [int(n) for n in args.objects.split(",")]
    except ValueError:
        parser.error(f"--objects: expected comma-separated integers, got {args.objects!r}")
    rows = run(args.config, args.device, objects, args.frames, args.backend, args.image_size, args.autocast,
               args.repeats)
    print(f"{args.config}, {args.image_size}px, {args.frames} frames, device {args.device}, "
          f"autocast {args.autocast}, fastest of {args.repeats}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(config=args.config, image_size=args.image_size, device=args.device,
                           autocast=args.autocast, rows=rows), handle, indent=2)


if __name__ == "__main__":
    main()
