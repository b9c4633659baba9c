"""The command line: ``python -m memenc_fast check | bench | kernels``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit code."""
    from . import bench, check, kernel_report

    parser = argparse.ArgumentParser(prog="python -m memenc_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, text in (
        ("check", check, "every available backend vs the float64 reference; non-zero exit on failure"),
        ("bench", bench, "reference (eager, torch.compile) vs every backend, or per-op timings (--ops)"),
        ("kernels", kernel_report, "compile every kernel for sm_80/sm_90a and report registers, spills, smem"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
