"""The layout ARCHITECTURE.md describes: the runtime imports no developer tool, the Triton kernels
import nothing from the rest of the package, and each backend keeps one file per op."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from memenc_fast.dispatch import OPS

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path, package: str) -> set:
    """Every module ``path`` imports (relative imports resolved against ``package``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _package_of(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "kernels":
        parts = ["memenc_fast"] + parts
    return ".".join(parts[:-1])


def test_import_walk_sees_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("from ..backends import torch_ops\nfrom ._common import Launch\nimport memenc_fast.dispatch\n")
    assert _imported_modules(module, "memenc_fast.kernels") == {
        "memenc_fast.backends", "memenc_fast.backends.torch_ops", "memenc_fast.kernels._common",
        "memenc_fast.kernels._common.Launch", "memenc_fast.dispatch"}


def test_import_memenc_fast_loads_no_tool_and_no_backend_ops():
    code = ("import sys, memenc_fast; print(sorted(m for m in sys.modules if m.startswith("
            "('memenc_fast.tools', 'memenc_fast.kernels', 'memenc_fast.backends.triton', 'memenc_fast.backends.cuda'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def test_kernels_import_nothing_from_the_rest_of_the_package():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        outside = {m for m in _imported_modules(path, _package_of(path))
                   if m.startswith("memenc_fast") and not m.startswith("memenc_fast.kernels")}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_the_runtime_imports_no_tool():
    # __main__ is the command line's entry point: the tools' front door.
    runtime = [p for p in (ROOT / "memenc_fast").rglob("*.py")
               if "tools" not in p.relative_to(ROOT).parts and p.name != "__main__.py"]
    for path in runtime:
        tools = {m for m in _imported_modules(path, _package_of(path)) if m.startswith("memenc_fast.tools")}
        assert not tools, f"{path.relative_to(ROOT)} imports {sorted(tools)}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_each_kernel_backend_has_one_module_per_op(backend):
    folder = ROOT / "memenc_fast" / "backends" / backend
    # Besides op modules: __init__ (the op table, "can it run"), shared _-prefixed helpers, and the
    # CUDA library's binding.
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")} - {"library"}
    ops = set(OPS) - {"cxblock_out_proj"}  # the fused variant lives with cxblock
    assert modules <= ops, f"{backend}: modules that are not ops: {sorted(modules - ops)}"
    kernel_files = ROOT / ("kernels" if backend == "triton" else "csrc")
    suffix = ".py" if backend == "triton" else ".cu"
    for name in modules:
        assert (kernel_files / f"{name}{suffix}").is_file(), f"{backend} op {name} has no {name}{suffix}"
