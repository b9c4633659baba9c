"""SAM 2 video tracking with and without memenc-fast, on a synthetic video.

Builds sam2's video predictor from its own config (no checkpoint: seeded random weights, since
none can be downloaded here), writes a short video of moving shapes, clicks on the shapes, tracks
them through the video once as is and once after ``memenc_fast.patch_sam2``, and prints the
per-frame mask IoU between the two runs and the time per frame.

    python examples/sam2_video_patch.py --frames 6 --objects 2 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import memenc_fast as mf


def write_synthetic_video(folder: str, frames: int, size: int = 256, objects: int = 2, seed: int = 0
                          ) -> List[Tuple[float, float]]:
    """Writes ``frames`` JPEGs of ``objects`` coloured discs moving across a noisy background;
    returns each object's centre (x, y) in the first frame."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    starts = rng.uniform(0.25 * size, 0.75 * size, size=(objects, 2))
    velocity = rng.uniform(-4, 4, size=(objects, 2))
    colours = rng.integers(60, 255, size=(objects, 3))
    radius = size // 8
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(frames):
        image = rng.integers(0, 40, size=(size, size, 3)).astype(np.uint8)
        for obj in range(objects):
            cx, cy = starts[obj] + index * velocity[obj]
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = colours[obj]
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.jpg"), quality=95)
    return [tuple(s) for s in starts]


# The hydra route: the same config with memenc_fast's classes as targets.
MEMENC_FAST_OVERRIDES = [
    "++model.memory_encoder._target_=memenc_fast.MemoryEncoder",
    "++model.memory_encoder.position_encoding._target_=memenc_fast.PositionEmbeddingSine",
    "++model.memory_encoder.mask_downsampler._target_=memenc_fast.MaskDownSampler",
    "++model.memory_encoder.fuser._target_=memenc_fast.Fuser",
    "++model.memory_encoder.fuser.layer._target_=memenc_fast.CXBlock",
]


def build_predictor(config: str, device: str, image_size: int = 1024, seed: int = 0, overrides: List[str] = ()):
    """sam2's video predictor from its config, with seeded random weights; a smaller
    ``image_size`` (a multiple of 64) makes a quicker model of the same structure."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    return build_sam2_video_predictor(config, None, device=device,
                                      hydra_overrides_extra=[f"++model.image_size={image_size}", *overrides])


class EncoderTimer:
    """Time spent inside ``module``'s forward while active: CUDA events on a GPU (no extra
    synchronisation inside the loop), wall-clock on the CPU."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.module, self.cuda = module, torch.device(device).type == "cuda"
        self.spans: List[Tuple[object, object]] = []

    def _stamp(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self) -> "EncoderTimer":
        self._hooks = [self.module.register_forward_pre_hook(lambda *_: self.spans.append((self._stamp(), None))),
                       self.module.register_forward_hook(lambda *_: self._close())]
        return self

    def _close(self) -> None:
        self.spans[-1] = (self.spans[-1][0], self._stamp())

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        return sum(end - start for start, end in self.spans)


def track(predictor, video_dir: str, clicks: List[Tuple[float, float]], autocast: Optional[torch.dtype] = None
          ) -> Tuple[Dict[int, np.ndarray], float, float]:
    """Clicks once on each object in frame 0 and propagates (under ``autocast`` if given, as sam2's
    README runs it); returns {frame: (objects, H, W) mask logits}, the seconds per propagated frame
    and the memory encoder's share of them."""
    device = str(predictor.device)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=autocast,
                                                 enabled=autocast is not None):
        state = predictor.init_state(video_path=video_dir)
        for obj_id, (x, y) in enumerate(clicks, start=1):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id,
                                            points=np.array([[x, y]], dtype=np.float32),
                                            labels=np.array([1], dtype=np.int32))
        masks: Dict[int, np.ndarray] = {}
        with EncoderTimer(predictor.memory_encoder, device) as encoder_timer:
            begin = time.perf_counter()
            for frame_idx, _, mask_logits in predictor.propagate_in_video(state):
                masks[frame_idx] = mask_logits[:, 0].float().cpu().numpy()  # waits for the frame
            seconds = time.perf_counter() - begin
    frames = max(1, len(masks))
    return masks, seconds / frames, encoder_timer.seconds() / frames


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """The lower of the foreground and background IoUs of two thresholded logit maps (a mask that
    covers nearly everything agrees trivially on foreground, not on background)."""
    a, b = logits_a > 0, logits_b > 0
    return min(mask_iou(a, b), mask_iou(~a, ~b))


def compare(config: str, device: str, frames: int, objects: int, backend: str = "auto",
            image_size: int = 1024, via_hydra: bool = False, autocast: Optional[torch.dtype] = None,
            repeats: int = 1, cuda_graphs: bool = False) -> Dict[str, object]:
    """Tracks the same synthetic video with sam2 as is and with memenc-fast (``patch_sam2``, or
    the hydra config naming memenc_fast's classes); per-frame agreement and timings (the fastest of
    ``repeats`` runs each: the first pays for one-off compilation and autotuning). With
    ``cuda_graphs``, memenc-fast also tracks with ``cuda_graphs = True`` (``graphs_*`` entries)."""
    predictor = build_predictor(config, device, image_size)
    if via_hydra:
        patched = build_predictor(config, device, image_size, overrides=MEMENC_FAST_OVERRIDES)
        patched.load_state_dict(predictor.state_dict(), strict=True)
    else:
        patched = copy.deepcopy(predictor)
        mf.patch_sam2(patched)
    if not isinstance(patched.memory_encoder, mf.MemoryEncoder):
        raise RuntimeError("the memory encoder was not replaced")
    with tempfile.TemporaryDirectory() as video_dir:
        clicks = write_synthetic_video(video_dir, frames, objects=objects)
        runs = [track(predictor, video_dir, clicks, autocast) for _ in range(repeats)]
        with mf.use_backend(backend):
            fast_runs = [track(patched, video_dir, clicks, autocast) for _ in range(repeats)]
            patched.memory_encoder.cuda_graphs = cuda_graphs
            graph_runs = [track(patched, video_dir, clicks, autocast) for _ in range(repeats if cuda_graphs else 0)]
            patched.memory_encoder.cuda_graphs = False
    baseline, fast = runs[0][0], fast_runs[0][0]
    ious = {f: min(agreement(baseline[f][o], other[0][f][o]) for other in fast_runs[:1] + graph_runs[:1]
                   for o in range(objects)) for f in baseline}
    foreground = {f: float((baseline[f] > 0).mean()) for f in baseline}
    logit_error = {f: float(np.linalg.norm(fast[f] - baseline[f]) / np.linalg.norm(baseline[f])) for f in baseline}
    encoder = patched.memory_encoder
    return dict(ious=ious, foreground=foreground, logit_error=logit_error,
                mask_transform=(encoder.mask_scale, encoder.mask_bias),
                baseline_seconds=min(r[1] for r in runs), patched_seconds=min(r[1] for r in fast_runs),
                baseline_encoder_seconds=min(r[2] for r in runs),
                patched_encoder_seconds=min(r[2] for r in fast_runs), patched_backend=encoder.last_backend,
                **({} if not cuda_graphs else dict(graphs_seconds=min(r[1] for r in graph_runs),
                                                   graphs_encoder_seconds=min(r[2] for r in graph_runs))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--via-hydra", action="store_true", help="build from a config naming memenc_fast's classes")
    args = parser.parse_args()
    result = compare(args.config, args.device, args.frames, args.objects, args.backend, args.image_size,
                     args.via_hydra)
    for frame, iou in sorted(result["ious"].items()):
        print(f"frame {frame}: min IoU (foreground and background) {iou:.4f}, "
              f"foreground {100 * result['foreground'][frame]:.1f}% of pixels, "
              f"mask logits rel. difference {result['logit_error'][frame]:.2e}")
    print(f"per frame: sam2 {result['baseline_seconds'] * 1e3:.1f} ms "
          f"(memory encoder {result['baseline_encoder_seconds'] * 1e3:.2f} ms), "
          f"patched ({result['patched_backend']}) {result['patched_seconds'] * 1e3:.1f} ms "
          f"(memory encoder {result['patched_encoder_seconds'] * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
