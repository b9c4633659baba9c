"""SAM 2's own video predictor, end to end, with and without memenc-fast (examples/sam2_video_patch.py)."""

import importlib.util
import os

import pytest

from helpers import requires_sam2

pytestmark = requires_sam2

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "sam2_video_patch.py")


def _example():
    spec = importlib.util.spec_from_file_location("sam2_video_patch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
