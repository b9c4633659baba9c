"""Shared pieces of the command-line tools: argument converters, tables, JSON files, progress lines.

The converters are argparse ``type=`` functions: a bad value stops the command while its arguments
are parsed, before any work, with argparse's exit code 2 and a one-line reason that says what was
expected and what was given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..dispatch import AUTO, registered_backends
from .kernel_report import writable_file
from .presets import PRESETS

__all__ = [
    "DTYPES",
    "dtype_name",
    "parse_ints",
    "positive_int",
    "batch_sizes",
    "dtype_list",
    "backend_list",
    "preset_list",
    "torch_device",
    "default_device",
    "writable_file",
    "plot_file",
    "Column",
    "format_cell",
    "print_table",
    "write_json",
    "progress",
    "exit_status",
]

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


def _names_from(text: str, known: Sequence[str], what: str) -> List[str]:
    """The items of comma list ``text``, each once, in their first order; ArgumentTypeError unless
    each is one of ``known``."""
    names = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {what} from {', '.join(known)}; got {text!r}"
            + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    return names


def parse_ints(text: str) -> List[int]:
    """``"1,8,32"`` -> [1, 8, 32]; anything else raises ValueError naming the input."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected a comma list of positive integers; got {text!r}")
    return values


# ---- argparse converters -------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An integer of at least 1 (a batch size, a repeat count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def batch_sizes(text: str) -> List[int]:
    """``"1,8,32"`` -> [1, 8, 32], each size once."""
    try:
        return list(dict.fromkeys(parse_ints(text)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def dtype_list(text: str) -> List[torch.dtype]:
    """``"fp32,bf16"`` -> [torch.float32, torch.bfloat16]."""
    return [DTYPES[name] for name in _names_from(text, list(DTYPES), "dtypes")]


def backend_list(text: str) -> List[str]:
    """Backend names this build registers (available here or not), or ``auto``."""
    return _names_from(text, [AUTO] + registered_backends(), "backends")


def preset_list(text: str) -> List[str]:
    """Names of the model/input sizes in ``presets.PRESETS``."""
    return _names_from(text, sorted(PRESETS), "presets")


def torch_device(text: str) -> torch.device:
    """A device torch knows and this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``meta``..."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1; got {text!r}") from None
    # Accelerators have a torch.<type> module that knows how many this machine has (meta has none).
    accelerator = getattr(torch, device.type, None)
    if not (hasattr(accelerator, "is_available") and hasattr(accelerator, "device_count")):
        return device
    kind = device.type.upper()
    if not accelerator.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r} asked for, but this machine has no {kind} device "
            f"(torch.{device.type}.is_available() is False)")
    count = accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(
            f"{text!r} asked for, but this machine has {count} {kind} device{'s' if count != 1 else ''} "
            f"({device.type}:0 to {device.type}:{count - 1})")
    return device


def default_device() -> torch.device:
    """cuda when this machine has a CUDA device, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plot_file(text: str) -> Path:
    """:func:`writable_file` for an image matplotlib writes (the format is the file's suffix);
    refuses when matplotlib is not installed."""
    path = writable_file(text)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError(
            "needs matplotlib, which is not installed here (pip install matplotlib)") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(
            f"expected an image file name ending in .png (or .{', .'.join(f for f in formats if f != 'png')}); "
            f"got {text!r}")
    return path


# ---- output --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: its header, the row key it shows and, for numbers, one ``str.format``
    template for every cell (``"{:.2e}"``), so that a column reads in one format."""

    header: str
    key: str
    number_format: Optional[str] = None


def format_cell(value: object, number_format: Optional[str]) -> str:
    """``value`` as a table cell: ``-`` for a missing value, numbers in ``number_format``."""
    if value is None:
        return "-"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or number_format is None:
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return number_format.format(value)


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[Column], title: str = "") -> None:
    """Prints ``rows`` as a markdown table, numeric columns aligned right."""
    if title:
        print(f"\n{title}\n")
    cells = [[format_cell(row.get(column.key), column.number_format) for column in columns] for row in rows]
    widths = [max([len(column.header)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    right = [column.number_format is not None for column in columns]

    def line(texts: Sequence[str]) -> str:
        return "| " + " | ".join(t.rjust(w) if r else t.ljust(w) for t, w, r in zip(texts, widths, right)) + " |"

    print(line([column.header for column in columns]))
    print("|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|")
    for texts in cells:
        print(line(texts))
    sys.stdout.flush()


def write_json(path: Optional[Path], payload: Mapping[str, object]) -> None:
    """Writes ``payload`` to ``path`` as indented JSON (nothing when ``path`` is None)."""
    if path is None:
        return
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    progress(f"wrote {path}")


def progress(message: str) -> None:
    """One progress line on stderr, so tables on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


def exit_status(rows: Sequence[Mapping[str, object]], what: str) -> int:
    """Says how many of ``rows`` (each with a ``status``) did not pass, on stderr, or that all of
    them passed, on stdout; the command's exit status: 1 when any failed, else 0. ``what`` names
    a row in the plural ("checks", "cases")."""
    failed = [row for row in rows if row["status"] != "PASS"]
    if failed:
        print(f"{len(failed)} of {len(rows)} {what} failed", file=sys.stderr)
        return 1
    print(f"all {len(rows)} {what} passed")
    return 0
