"""The command line: ``python -m memenc_fast check | bench | info | kernels``."""

from __future__ import annotations

import argparse
import sys
from typing import List, NoReturn, Optional

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: what was wrong, and where the options are listed
    (argparse's default puts a usage block of several lines before the reason)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit code (2 for bad arguments,
    which are all refused here, before any work)."""
    from . import bench, check, info, kernel_report

    parser = _Parser(prog="python -m memenc_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, text in (
        ("check", check, "every available backend vs the float64 reference; non-zero exit on failure"),
        ("bench", bench, "reference (eager, torch.compile) vs every backend, or per-op timings (--ops)"),
        ("info", info, "versions, devices, backends and the CUDA library on this machine"),
        ("kernels", kernel_report, "compile every kernel for every GPU generation (sm_75 to sm_120) and report "
                                   "registers, spills, shared memory, tensor cores, waves"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or arguments refused: return the code like a run's
        return int(exit_request.code or 0)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
