"""The repository's top-level ``kernels/`` folder (installed as ``memenc_fast.kernels``) never
shadows an installed top-level ``kernels`` package, such as the Hugging Face one transformers 5
installs, whose ``egg_info.writers`` plugin setuptools imports while building this package.

A stand-in package plays the installed one: a ``kernels`` package with ``_internals/locking.py`` and
a ``.dist-info`` declaring the plugin, on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRITER = '''from pathlib import Path


def write_egg_lockfile(cmd, basename, filename):
    """An egg_info writer: records the egg-info file it was asked for, next to this module."""
    with open(Path(__file__).with_name("calls.txt"), "a") as calls:
        calls.write(filename + "\\n")
'''


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    """A folder holding an installed-looking ``kernels`` package with an ``egg_info.writers`` plugin."""
    site = tmp_path / "site"
    package = site / "kernels"
    (package / "_internals").mkdir(parents=True)
    (package / "__init__.py").write_text('"""Stand-in for an installed kernels package."""\n')
    (package / "_internals" / "__init__.py").write_text("")
    (package / "_internals" / "locking.py").write_text(WRITER)
    info = site / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[egg_info.writers]\nkernels.lock = kernels._internals.locking:write_egg_lockfile\n"
    )
    return site


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(overrides)
    return env


def test_import_kernels_from_the_repository_finds_the_installed_package(standin: Path) -> None:
    code = ("import kernels, kernels._internals.locking, memenc_fast.kernels as ours; "
            "print(kernels.__file__); print(kernels._internals.locking.__file__); print(ours.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(PYTHONPATH=str(standin)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    package, locking, ours = proc.stdout.split()
    assert Path(package) == standin / "kernels" / "__init__.py"
    assert Path(locking) == standin / "kernels" / "_internals" / "locking.py"
    assert ours == "memenc_fast.kernels"


def test_import_kernels_from_the_repository_without_an_installed_one_says_what_the_folder_is() -> None:
    # -S: no site-packages, so no installed kernels package either.
    proc = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "Triton kernels folder" in last, proc.stderr
    assert "memenc_fast.kernels" in last


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_build_without_isolation_beside_an_installed_kernels_plugin(
    tmp_path: Path, standin: Path, editable: bool
) -> None:
    """``pip install --no-build-isolation [-e]`` of a copy of the sources: setuptools imports the
    stand-in's plugin while the build runs from a tree whose top holds ``kernels/``."""
    pytest.importorskip("setuptools", minversion="64")  # what pyproject.toml asks of the build env
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, source / name)
    # What a build reads, without the built CUDA library or caches of this checkout.
    skip = shutil.ignore_patterns("__pycache__", "_lib", "*.egg-info")
    for name in ("build_tools", "kernels", "memenc_fast"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    prefix = tmp_path / "prefix"
    # --ignore-installed: with --prefix alone, pip uninstalls this environment's memenc-fast first.
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--ignore-installed", "--prefix", str(prefix), *(["-e"] if editable else []), str(source)]
    env = _env(PYTHONPATH=str(standin), MEMENC_FAST_SKIP_CUDA="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = (standin / "kernels" / "_internals" / "calls.txt").read_text().split()
    assert calls and all(Path(call).name == "kernels.lock" for call in calls)
    if not editable:
        installed = list(prefix.glob("lib/python*/site-packages/memenc_fast/kernels/cxblock.py"))
        assert len(installed) == 1
