"""Per-frame time of SAM 2's video predictor with and without memenc-fast, by object count.

Runs examples/sam2_video_patch.py's comparison (seeded random sam2 weights, a synthetic video of
moving discs, one click per object, ``propagate_in_video``) for each object count, and prints
the time per frame of the whole predictor and of its memory encoder alone, as is and after
``patch_sam2``, with the two runs' mask agreement. Each timing is the fastest of ``--repeats``
runs (the first pays for compilation and autotuning). ``--cuda-graphs`` adds the patched
predictor with ``cuda_graphs = True`` on the encoder (sam2 1.1's predictor encodes each object in
a call of its own, B=1, where launch overhead is most of a GPU's time). Needs sam2 installed.

    python benchmarks/bench_video.py --objects 1,8,32 --frames 8 --cuda-graphs --json video.json
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
        autocast: str, repeats: int, cuda_graphs: bool = False) -> List[Dict[str, object]]:
    """One row per object count: milliseconds per frame (predictor and memory encoder, as is,
    patched, and patched with CUDA graphs when asked), the speedups and the lowest per-frame mask
    agreement."""
    example = load_example()
    rows = []
    for count in objects:
        result = example.compare(config, device, frames, count, backend, image_size,
                                 autocast=AUTOCAST[autocast], repeats=repeats, cuda_graphs=cuda_graphs)
        row: Dict[str, object] = dict(objects=count, frames=frames, backend=result["patched_backend"])
        for label, key in (("sam2", "baseline"), ("patched", "patched"), ("graphs", "graphs")):
            if f"{key}_seconds" in result:
                row[f"{label}_ms_per_frame"] = 1e3 * result[f"{key}_seconds"]
                row[f"{label}_encoder_ms_per_frame"] = 1e3 * result[f"{key}_encoder_seconds"]
                row[f"{label}_speedup"] = result["baseline_seconds"] / result[f"{key}_seconds"]
                row[f"{label}_encoder_speedup"] = result["baseline_encoder_seconds"] / result[f"{key}_encoder_seconds"]
        row["min_iou"] = min(result["ious"].values())
        rows.append(row)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """The rows as a markdown table: per frame, the whole predictor and (in brackets) its encoder."""
    labels = [label for label in ("sam2", "patched", "graphs") if f"{label}_ms_per_frame" in rows[0]]
    names = {"sam2": "sam2", "patched": "patched", "graphs": "patched + CUDA graphs"}
    header = ["objects", "backend"] + [f"{names[label]} ms/frame (encoder)" for label in labels]
    header += [f"{names[label]} speedup (encoder)" for label in labels[1:]] + ["min IoU"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:", "---"] + ["---:"] * (len(header) - 2)) + " |"]
    for r in rows:
        cells = [str(r["objects"]), str(r["backend"])]
        cells += [f"{r[f'{label}_ms_per_frame']:.2f} ({r[f'{label}_encoder_ms_per_frame']:.3f})" for label in labels]
        cells += [f"{r[f'{label}_speedup']:.2f}x ({r[f'{label}_encoder_speedup']:.2f}x)" for label in labels[1:]]
        cells.append(f"{r['min_iou']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
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
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the patched encoder with cuda_graphs = True")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    try:
        objects = [int(n) for n in args.objects.split(",")]
    except ValueError:
        parser.error(f"--objects: expected comma-separated integers, got {args.objects!r}")
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        parser.error(f"--cuda-graphs: expected a CUDA --device, got {args.device!r}")
    rows = run(args.config, args.device, objects, args.frames, args.backend, args.image_size, args.autocast,
               args.repeats, args.cuda_graphs)
    print(f"{args.config}, {args.image_size}px, {args.frames} frames, device {args.device}, "
          f"autocast {args.autocast}, fastest of {args.repeats}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(config=args.config, image_size=args.image_size, device=args.device,
                           autocast=args.autocast, rows=rows), handle, indent=2)


if __name__ == "__main__":
    main()
