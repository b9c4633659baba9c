"""SAM 2's own video predictor, end to end, with and without memenc-fast (examples/sam2_video_patch.py,
and its timing by object count in benchmarks/bench_video.py)."""

import importlib.util
import os

import pytest
import torch

import memenc_fast as mf
from memenc_fast.numerics import judge

from helpers import CUDA_FUSED_BACKENDS, requires_cuda, requires_sam2

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
    # On the CPU cuda_graphs changes nothing, but the third run and its columns are still made.
    rows = bench.run("configs/sam2.1/sam2.1_hiera_t.yaml", "cpu", [1, 2], frames=2, backend="torch", image_size=256,
                     autocast="none", repeats=1, cuda_graphs=True)
    assert [row["objects"] for row in rows] == [1, 2]
    for row in rows:
        assert row["backend"] == "torch" and row["min_iou"] >= 0.99
        for who in ("sam2", "patched", "graphs"):
            assert 0 < row[f"{who}_encoder_ms_per_frame"] < row[f"{who}_ms_per_frame"]
        assert row["patched_speedup"] == pytest.approx(row["sam2_ms_per_frame"] / row["patched_ms_per_frame"])
    lines = bench.table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1 | torch | ")
    assert "patched + CUDA graphs ms/frame (encoder)" in lines[0]
    assert lines[0].count("|") == 9  # objects, backend, three timings, two speedups, IoU
    assert bench.table([{k: v for k, v in r.items() if not k.startswith("graphs")} for r in rows]).count("CUDA") == 0


@requires_cuda
@pytest.mark.heavy
@pytest.mark.parametrize("backend", [b for b in CUDA_FUSED_BACKENDS if b in ("triton", "cuda")])
def test_gpu_video_tracking_agrees_with_sam2(backend):
    result = _example().compare("configs/sam2.1/sam2.1_hiera_t.yaml", "cuda", frames=4, objects=3, backend=backend)
    assert result["patched_backend"] == backend
    for frame, iou in result["ious"].items():
        assert iou >= 0.99, f"frame {frame}: IoU {iou}"
        assert result["logit_error"][frame] < 1e-2


def test_vos_optimized_predictor_takes_the_patch_and_ours_compiles_the_same_way():
    """SAM 2.1's fast predictor (``vos_optimized=True``) compiles its memory encoder's forward in
    place (max-autotune, fullgraph, static shapes). patch_sam2 swaps in ours, uncompiled (its
    kernels are already fused); compiled with the predictor's settings it gives the same result."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                                           vos_optimized=True, hydra_overrides_extra=["++model.image_size=256"])
    original = predictor.memory_encoder
    assert "forward" in vars(original)  # the predictor's compiled forward, bound to its own module
    encoder = mf.patch_sam2(predictor)
    assert predictor.memory_encoder is encoder and "forward" not in vars(encoder)
    generator = torch.Generator().manual_seed(1)
    pix_feat = torch.randn(2, 256, 16, 16, generator=generator)
    probabilities = torch.sigmoid(3 * torch.randn(2, 1, 256, 256, generator=generator))
    with torch.no_grad():
        expected = type(original).forward(original, pix_feat, probabilities * 20.0 - 10.0, skip_mask_sigmoid=True)
    encoder.forward = torch.compile(encoder.forward, mode="max-autotune", fullgraph=True, dynamic=False)
    with torch.no_grad(), mf.use_backend("torch"):
        out = encoder(pix_feat, probabilities, skip_mask_sigmoid=True)
    verdict = judge(out["vision_features"], expected["vision_features"].double(), torch.float32)
    assert verdict.passed, verdict.describe()
    torch.testing.assert_close(out["vision_pos_enc"][0], expected["vision_pos_enc"][0])
