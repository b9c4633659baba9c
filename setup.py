"""Packaging for memenc-fast.

Installs ``memenc_fast`` with the repository's top-level ``kernels/`` directory mapped to the
subpackage ``memenc_fast.kernels`` (there is no top-level ``kernels`` module), and compiles
``csrc/*.cu`` with nvcc into ``memenc_fast/_lib/libmemenc_fast_cuda.so`` (see
build_tools/cuda_build.py for the knobs: MEMENC_FAST_CUDA_ARCHS, MEMENC_FAST_SKIP_CUDA, CUDA_HOME).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_cuda_build() -> ModuleType:
    """build_tools/cuda_build.py, a helper of this script that is not installed, loaded by path.

    The repository root stays off ``sys.path``: there its ``kernels/`` folder would shadow an
    installed top-level ``kernels`` package, such as Hugging Face's, whose ``egg_info.writers``
    plugin setuptools imports during the build.
    """
    spec = importlib.util.spec_from_file_location("_memenc_fast_cuda_build", ROOT / "build_tools" / "cuda_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their defining module there
    spec.loader.exec_module(module)
    return module


build_cuda_library = _load_cuda_build().build_cuda_library

PACKAGE = "memenc_fast"
LIB_SUBDIR = "_lib"  # not a Python package: the shared library, its launch-args header, ptxas report


class BinaryDistribution(Distribution):
    """Always run build_ext (which builds the CUDA library) and tag wheels per platform.

    There is no setuptools ``Extension`` to build, so without this setuptools would neither run
    build_ext nor mark a wheel holding a .so as platform-specific.
    """

    def has_ext_modules(self) -> bool:
        return True


class BuildExtWithCuda(build_ext):
    """build_ext that also compiles ``csrc/*.cu`` into one shared library inside the package.

    Non-editable builds write the library into build_lib, from where it goes into the wheel;
    editable builds (``pip install -e``, ``setup.py build_ext --inplace``) write it next to the
    sources in ``memenc_fast/_lib/``.
    """

    def initialize_options(self) -> None:
        super().initialize_options()
        self._cuda_files: list[str] = []  # names of what the CUDA step produced, in LIB_SUBDIR

    def run(self) -> None:
        super().run()
        output_dir = self._inplace_lib_dir() if self.inplace else self._build_lib_dir()
        result = build_cuda_library(ROOT / "csrc", output_dir)
        if result is not None:
            self._cuda_files = [result.library.name, result.report.name]
            if result.header is not None:
                self._cuda_files.append(result.header.name)

    def _build_lib_dir(self) -> Path:
        return Path(self.build_lib) / PACKAGE / LIB_SUBDIR

    def _inplace_lib_dir(self) -> Path:
        build_py = self.get_finalized_command("build_py")
        return Path(build_py.get_package_dir(PACKAGE)) / LIB_SUBDIR

    def get_outputs(self) -> list[str]:
        # In place, setuptools' convention is to list the build_lib path and map it to the file
        # in the source tree (get_output_mapping); strict editable installs link through it.
        return super().get_outputs() + [str(self._build_lib_dir() / f) for f in self._cuda_files]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace:
            for name in self._cuda_files:
                mapping[str(self._build_lib_dir() / name)] = str(self._inplace_lib_dir() / name)
        return mapping


setup(
    name="memenc-fast",
    version="0.1.0",
    description="Drop-in CUDA/Triton-accelerated replacement for SAM 2's memory encoder",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
        f"{PACKAGE}.kernels",
        *(f"{PACKAGE}.kernels.{sub}" for sub in find_packages("kernels")),
    ],
    # kernels/ lives at the top of the repository but installs as memenc_fast.kernels.
    # Editable installs: pip's default (setuptools' "lenient" mode) works: its import hook maps
    # memenc_fast.kernels to kernels/ from any working directory. `--config-settings
    # editable_mode=strict` works too (a link tree under build/; new files need a reinstall).
    # `editable_mode=compat` does not: it only puts the repository root on sys.path, so
    # memenc_fast.kernels is not found and a top-level `kernels` module appears instead.
    package_dir={f"{PACKAGE}.kernels": "kernels"},
    # numpy: torch warns on import without it ("Failed to initialize NumPy").
    install_requires=["torch>=2.7", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "numpy"],
        # sam2 itself installs separately: SAM2_BUILD_CUDA=0 pip install --no-deps sam2
        "sam2": ["hydra-core", "iopath", "pillow", "tqdm"],
        "plot": ["matplotlib"],
    },
    distclass=BinaryDistribution,
    cmdclass={"build_ext": BuildExtWithCuda},
    zip_safe=False,
)
