"""SAM 2's own video predictor, end to end, with and without memenc-fast (examples/sam2_video_patch.py,
and its timing by object count in benchmarks/bench_video.py)."""

import importlib.util
import os

import pytest

import memenc_fast as mf

from helpers import requires_cuda, requires_sam2

pytestmark = requires_sam2

BENCHMARK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_video.py")


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_video", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example():
    return _benchmark().load_example()


@pytest.mark.parametrize("via_hydra", [False, True], ids=["patch_sam2", "hydra_config"])
def test_video_tracking_agrees_with_sam2(via_hydra):
    # 512-pixel frames: the same model structure, a quarter of the CPU time of 1024.
    result = _example().compare("configs/sam2.1/sam2.1_hiera_t.yaml", "cpu", frames=3, objects=2,
                                backend="torch", image_size=512, via_hydra=via_hydra)
    assert result["patched_backend"] == "torch"
    # patch_sam2 moves the model's sigmoid * 20 - 10 into the encoder; the hydra route keeps it outside.
    assert result["mask_transform"] == ((1.0, 0.0) if via_hydra else (20.0, -10.0))
    assert sorted(result["ious"]) == [0, 1, 2]
    for frame, iou in result["ious"].items():
        assert iou >= 0.99, f"frame {frame}: IoU {iou}"
        assert 0.0 < result["foreground"][frame] < 1.0
        assert result["logit_error"][frame] < 1e-4


def test_video_benchmark_times_each_object_count():
    bench = _benchmark()
    rows = bench.run("configs/sam2.1/sam2.1_hiera_t.yaml", "cpu", [1, 2], frames=2, backend="torch", image_size=256,
                     autocast="none", repeats=1)
    assert [row["objects"] for row in rows] == [1, 2]
    for row in rows:
        assert row["backend"] == "torch" and row["min_iou"] >= 0.99
        for who in ("sam2", "patched"):
            assert 0 < row[f"{who}_encoder_ms_per_frame"] < row[f"{who}_ms_per_frame"]
        assert row["speedup"] == pytest.approx(row["sam2_ms_per_frame"] / row["patched_ms_per_frame"])
    lines = bench.table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1 | torch |")


@requires_cuda
@pytest.mark.heavy
@pytest.mark.parametrize("backend", [b for b in mf.available_backends("cuda") if b in ("triton", "cuda")])
def test_gpu_video_tracking_agrees_with_sam2(backend):
    result = _example().compare("configs/sam2.1/sam2.1_hiera_t.yaml", "cuda", frames=4, objects=3, backend=backend)
    assert result["patched_backend"] == backend
    for frame, iou in result["ious"].items():
        assert iou >= 0.99, f"frame {frame}: IoU {iou}"
        assert result["logit_error"][frame] < 1e-2
