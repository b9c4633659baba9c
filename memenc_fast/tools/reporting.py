"""Small shared pieces of the command-line tools: dtype names, tables, progress lines."""

from __future__ import annotations

import math
import sys
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["DTYPES", "dtype_name", "parse_dtypes", "parse_ints", "print_table", "progress", "format_value"]

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (fp32, bf16, ...) of a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def parse_dtypes(text: str) -> List[torch.dtype]:
    """``"fp32,bf16"`` -> [torch.float32, torch.bfloat16]; unknown names raise ValueError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        raise ValueError(f"dtypes must be a comma list of {sorted(DTYPES)}; got {text!r}")
    return [DTYPES[n] for n in names]


def parse_ints(text: str) -> List[int]:
    """``"1,8,32"`` -> [1, 8, 32]; anything else raises ValueError naming the input."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected a comma list of positive integers; got {text!r}")
    return values


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(rows: Sequence[Dict[str, object]], columns: Sequence[Tuple[str, str]], title: str = "") -> None:
    """Prints ``rows`` as a markdown table with ``columns`` = [(header, key), ...]."""
    if title:
        print(f"\n{title}\n")
    headers = [h for h, _ in columns]
    cells = [[format_value(row.get(key)) for _, key in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
    sys.stdout.flush()


def progress(message: str) -> None:
    """One progress line on stderr, so tables on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)
