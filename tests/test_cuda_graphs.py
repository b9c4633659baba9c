"""CUDA graphs: the module's opt-in graph cache (``cuda_graphs = True``) and a caller's own capture.

CPU part: the cache's bookkeeping (one capture per signature, TF32 flags, structure and set of
parameter addresses; graphs of replaced parameters dropped; in-place updates replayed, not
recaptured; fresh outputs) with the capture replaced by a stand-in that runs eagerly, and the
order of one graph's uses across streams, with streams and events that log what they are asked.
GPU part (``requires_cuda``), on every backend that runs on the GPU: replays with new inputs match
the reference; a change of shape or dtype captures anew; weight changes (load_state_dict, in-place
updates) reach the replays; results are not aliased between calls; a side stream; one graph used
from two streams and from two threads at once; a change of TF32 flags captures anew; and a
forward captured by the caller with ``torch.cuda.graph`` replays correctly.
"""

from __future__ import annotations

import threading
from typing import Callable, List

import pytest
import torch

import memenc_fast as mf
from memenc_fast import graphs
from memenc_fast.numerics import judge, relative_error
from memenc_fast.structure import read_structure

from helpers import (CUDA_FUSED_BACKENDS, PRESETS, build_encoder, make_inputs, reference_outputs, requires_cuda,
                     tf32_settings)

SMALL = PRESETS["small"]


class _EagerGraph:
    """Stands in for a captured graph on the CPU: replay reruns the forward on the static inputs
    (on the current stand-in stream, which logs it)."""

    def __init__(self, forward: Callable, inputs: tuple, output: torch.Tensor) -> None:
        self.forward, self.inputs, self.output, self.replays = forward, inputs, output, 0

    def replay(self) -> None:
        self.output.copy_(self.forward(*self.inputs))
        self.replays += 1
        _FakeStream.current.log.append((_FakeStream.current.name, "replay"))


class _FakeEvent:
    """A CUDA event's stand-in: remembers the stream of its last record."""

    def __init__(self) -> None:
        self.recorded_on = None

    def record(self, stream: "_FakeStream") -> None:
        self.recorded_on = stream.name
        stream.log.append((stream.name, "record"))

    def synchronize(self) -> None:
        _FakeStream.current.log.append(("host", f"synchronize after {self.recorded_on}"))


class _FakeStream:
    """A CUDA stream's stand-in, logging into a shared list what it is asked to do."""

    current: "_FakeStream"

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: _FakeEvent) -> None:
        self.log.append((self.name, f"wait for {event.recorded_on}"))


@pytest.fixture
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """CUDA streams and events stood in for on the CPU; returns a switch of the current stream
    (``fake_streams.log`` holds what the streams were asked, in order)."""
    log: list = []
    streams = {}

    def use(name: str) -> None:
        _FakeStream.current = streams.setdefault(name, _FakeStream(name, log))

    use("default")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream.current)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    use.log = log
    return use


def _eager_capture(captures: List[graphs._Captured]):
    def capture(structure, forward, pix_feat, masks):
        inputs = (pix_feat.clone(), masks.clone())
        output = forward(*inputs)
        captured = graphs._Captured(_EagerGraph(forward, inputs, output), inputs, output, structure)
        captures.append(captured)
        return captured

    return capture


def test_graph_cache_captures_once_per_signature_and_drops_replaced_weights(monkeypatch, fake_streams):
    captures: List[graphs._Captured] = []
    monkeypatch.setattr(graphs.GraphCache, "_capture", staticmethod(_eager_capture(captures)))
    encoder = build_encoder(SMALL, seed=1)
    structure = read_structure(encoder)
    forward = lambda pix, mask: pix.sum(dim=1, keepdim=True) * mask.mean()  # noqa: E731
    cache = graphs.GraphCache()
    a = make_inputs(SMALL, 2, seed=3)
    b = make_inputs(SMALL, 2, seed=4)

    first = cache.run("sig", structure, forward, *a)
    second = cache.run("sig", structure, forward, *b)
    assert len(captures) == 1 and captures[0].graph.replays == 2 and len(cache) == 1
    torch.testing.assert_close(first, forward(*a), rtol=0, atol=0)  # not overwritten by the replay
    torch.testing.assert_close(second, forward(*b), rtol=0, atol=0)
    assert first.data_ptr() != captures[0].static_output.data_ptr()

    cache.run("other", structure, forward, *a)
    assert len(captures) == 2 and len(cache) == 2
    with torch.no_grad():
        encoder.fuser.layers[0].pwconv1.weight.mul_(2)  # in place: the graphs read it as they replay
    cache.run("sig", structure, forward, *a)
    assert len(captures) == 2
    encoder.load_state_dict(build_encoder(SMALL, seed=2).state_dict())  # copies in place too
    cache.run("sig", structure, forward, *a)
    assert len(captures) == 2
    encoder.fuser.layers[0].pwconv1.weight.data = encoder.fuser.layers[0].pwconv1.weight.data.clone()
    cache.run("sig", structure, forward, *a)  # a new address: the graphs of the old one go
    assert len(captures) == 3 and len(cache) == 1
    cache.run("sig", read_structure(encoder), forward, *a)  # another structure likewise
    assert len(captures) == 4 and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_graph_cache_keeps_the_most_recently_used_graphs(monkeypatch, fake_streams):
    captures: List[graphs._Captured] = []
    monkeypatch.setattr(graphs.GraphCache, "_capture", staticmethod(_eager_capture(captures)))
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    structure = read_structure(build_encoder(SMALL, seed=5))
    forward = lambda pix, mask: pix * mask.mean()  # noqa: E731
    cache = graphs.GraphCache()
    inputs = make_inputs(SMALL, 1, seed=6)
    for signature in ("a", "b", "a", "c"):  # "a" was used after "b": "b" goes when "c" comes
        cache.run(signature, structure, forward, *inputs)
    assert len(captures) == 3 and len(cache) == 2
    cache.run("a", structure, forward, *inputs)
    assert len(captures) == 3
    cache.run("b", structure, forward, *inputs)
    assert len(captures) == 4 and len(cache) == 2


def test_graph_cache_captures_anew_when_torchs_tf32_flags_change(monkeypatch, fake_streams):
    """The ops read the TF32 flags when they launch, so a captured graph holds one precision: a
    change of either flag captures anew, and going back replays the first graph."""
    captures: List[graphs._Captured] = []
    monkeypatch.setattr(graphs.GraphCache, "_capture", staticmethod(_eager_capture(captures)))
    structure = read_structure(build_encoder(SMALL, seed=7))
    forward = lambda pix, mask: pix * mask.mean()  # noqa: E731
    cache = graphs.GraphCache()
    inputs = make_inputs(SMALL, 1, seed=8)
    for conv, matmul in ((False, False), (True, False), (False, True), (True, True)):
        with tf32_settings(conv, matmul):
            cache.run("sig", structure, forward, *inputs)
    assert len(captures) == 4 and len(cache) == 4
    with tf32_settings(False, False):
        cache.run("sig", structure, forward, *inputs)
    assert len(captures) == 4 and captures[0].graph.replays == 2


def test_graph_uses_are_ordered_across_streams(monkeypatch, fake_streams):
    """Each use of a graph (inputs copied in, replay, output cloned) ends with an event recorded
    on its stream; a use on another stream first waits for that event, one on the same stream
    does not need to; clearing the cache waits on the host for the last use. The results are each
    call's own."""
    captures: List[graphs._Captured] = []
    monkeypatch.setattr(graphs.GraphCache, "_capture", staticmethod(_eager_capture(captures)))
    structure = read_structure(build_encoder(SMALL, seed=9))
    forward = lambda pix, mask: pix * mask.mean()  # noqa: E731
    cache = graphs.GraphCache()
    calls = [("a", make_inputs(SMALL, 1, seed=11)), ("a", make_inputs(SMALL, 1, seed=12)),
             ("b", make_inputs(SMALL, 1, seed=13)), ("a", make_inputs(SMALL, 1, seed=14))]
    for stream, inputs in calls:
        fake_streams(stream)
        torch.testing.assert_close(cache.run("sig", structure, forward, *inputs), forward(*inputs), rtol=0, atol=0)
    assert len(captures) == 1
    cache.clear()
    assert fake_streams.log == [
        ("a", "replay"), ("a", "record"),
        ("a", "replay"), ("a", "record"),
        ("b", "wait for a"), ("b", "replay"), ("b", "record"),
        ("a", "wait for b"), ("a", "replay"), ("a", "record"),
        ("host", "synchronize after a"),
    ]


def _gpu_case(backend: str, dtype: torch.dtype = torch.bfloat16, seed: int = 10):
    device = torch.device("cuda")
    encoder = build_encoder(SMALL, seed=seed, dtype=dtype, device=device)
    encoder.cuda_graphs = True
    return encoder, [make_inputs(SMALL, 2, seed=seed + i, dtype=dtype, device=device) for i in (1, 2, 3)]


def _check(out: dict, encoder: torch.nn.Module, pix_feat: torch.Tensor, masks: torch.Tensor,
           dtype: torch.dtype) -> None:
    oracle = reference_outputs(encoder, pix_feat, masks, torch.float64)
    same = reference_outputs(encoder, pix_feat, masks, dtype)
    verdict = judge(out["vision_features"], oracle["vision_features"], dtype, "cuda",
                    same_dtype_ref=same["vision_features"])
    assert verdict.passed, verdict.describe()
    assert out["vision_pos_enc"][0].shape == out["vision_features"].shape


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_graph_replays_match_the_reference(backend):
    encoder, inputs = _gpu_case(backend)
    with torch.no_grad(), mf.use_backend(backend):
        outs = [encoder(*pair) for pair in inputs]
    assert len(encoder._graphs) == 1 and encoder.last_backend == backend
    for out, pair in zip(outs, inputs):
        _check(out, encoder, *pair, torch.bfloat16)
    with torch.no_grad(), mf.use_backend(backend):
        again = encoder(*inputs[0])["vision_features"]
    torch.testing.assert_close(outs[0]["vision_features"], again, rtol=0, atol=0)  # earlier results kept


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_graphs_follow_shape_dtype_and_weight_changes(backend):
    encoder, inputs = _gpu_case(backend, seed=20)
    device = torch.device("cuda")
    with torch.no_grad(), mf.use_backend(backend):
        encoder(*inputs[0])
        one = (inputs[1][0][:1], inputs[1][1][:1])  # a new batch size: a second graph
        _check(encoder(*one), encoder, *one, torch.bfloat16)
        assert len(encoder._graphs) == 2
        masks = make_inputs(SMALL, 2, seed=24, dtype=torch.bfloat16, device=device, mask_size=(192, 128))[1]
        wide = (torch.randn(2, SMALL.in_dim, 12, 8, device=device, dtype=torch.bfloat16), masks)
        _check(encoder(*wide), encoder, *wide, torch.bfloat16)

        captured = len(encoder._graphs)
        other = build_encoder(SMALL, seed=25, dtype=torch.bfloat16, device=device)
        encoder.load_state_dict(other.state_dict())  # in place: replays read the new weights
        _check(encoder(*inputs[0]), other, *inputs[0], torch.bfloat16)
        for parameter in encoder.fuser.parameters():
            parameter.mul_(0.75)
        _check(encoder(*inputs[0]), encoder, *inputs[0], torch.bfloat16)
        assert len(encoder._graphs) == captured

        weight = encoder.fuser.layers[0].pwconv1.weight
        weight.data = weight.data * 1.5  # a new tensor: captured anew, the old graphs dropped
        _check(encoder(*inputs[0]), encoder, *inputs[0], torch.bfloat16)
        assert len(encoder._graphs) == 1

        encoder.float()
        as_fp32 = [t.float() for t in inputs[2]]
        out = encoder(*as_fp32)
        assert out["vision_features"].dtype == torch.float32
        _check(out, encoder, *as_fp32, torch.float32)


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_graphs_on_a_side_stream_and_with_grad_left_alone(backend):
    encoder, inputs = _gpu_case(backend, seed=30)
    stream = torch.cuda.Stream()
    with torch.no_grad(), mf.use_backend(backend):
        with torch.cuda.stream(stream):
            out = encoder(*inputs[0])
        stream.synchronize()
    _check(out, encoder, *inputs[0], torch.bfloat16)
    graphs_before = len(encoder._graphs)
    pix_feat = inputs[1][0].clone().requires_grad_()
    with mf.use_backend("auto"):
        encoder(pix_feat, inputs[1][1])["vision_features"].float().sum().backward()
    assert len(encoder._graphs) == graphs_before and pix_feat.grad is not None  # training never replays


def _eager_features(encoder: torch.nn.Module, backend: str, inputs: list) -> List[torch.Tensor]:
    """What the fused forward gives for each input pair without graphs."""
    encoder.cuda_graphs = False
    with torch.no_grad(), mf.use_backend(backend):
        expected = [encoder(*pair)["vision_features"] for pair in inputs]
    encoder.cuda_graphs = True
    return expected


def _check_same(outs: List[torch.Tensor], expected: List[torch.Tensor]) -> None:
    """Each replay's output is its own inputs' (another call's inputs give an unrelated result)."""
    for i, (out, want) in enumerate(zip(outs, expected)):
        error = relative_error(out, want)
        assert error < 1e-2, (i, error)


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_one_graph_used_from_two_streams_back_to_back(backend):
    """SAM 2 size at B=4, so that a replay runs long enough for the other stream's input copy
    to land in the middle of it were the uses not ordered: the second stream's use waits."""
    preset = PRESETS["sam2"]
    device = torch.device("cuda")
    encoder = build_encoder(preset, seed=60, dtype=torch.bfloat16, device=device)
    inputs = [make_inputs(preset, 4, seed=s, dtype=torch.bfloat16, device=device) for s in (61, 62, 63, 64)]
    expected = _eager_features(encoder, backend, inputs)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), mf.use_backend(backend):
        encoder(*inputs[0])  # the capture
        outs = []
        for i, pair in enumerate(inputs):
            with torch.cuda.stream(streams[i % 2]):
                outs.append(encoder(*pair)["vision_features"])
    torch.cuda.synchronize()
    assert len(encoder._graphs) == 1
    _check_same(outs, expected)


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_one_graph_hammered_from_two_threads(backend):
    """Two threads, each on its own stream, replay one cached graph with their own inputs, many
    times without synchronizing: every result is that call's own inputs'."""
    preset = PRESETS["sam2"]
    device = torch.device("cuda")
    encoder = build_encoder(preset, seed=65, dtype=torch.bfloat16, device=device)
    inputs = [make_inputs(preset, 2, seed=s, dtype=torch.bfloat16, device=device) for s in (66, 67, 68)]
    expected = _eager_features(encoder, backend, inputs)
    with torch.no_grad(), mf.use_backend(backend):
        encoder(*inputs[0])  # the capture
    torch.cuda.synchronize()
    results: List[List[tuple]] = [[], []]
    errors: List[BaseException] = []

    def hammer(worker: int) -> None:
        try:
            stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(stream), torch.no_grad(), mf.use_backend(backend):
                for step in range(12):
                    which = (step + worker) % len(inputs)
                    results[worker].append((which, encoder(*inputs[which])["vision_features"]))
            stream.synchronize()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(worker,)) for worker in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(encoder._graphs) == 1
    for worker_results in results:
        assert len(worker_results) == 12
        _check_same([out for _, out in worker_results], [expected[which] for which, _ in worker_results])


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_graphs_follow_torchs_tf32_flags(backend):
    """fp32: a graph captured with TF32 allowed is not replayed once it is not: IEEE's 1e-5 holds."""
    encoder, inputs = _gpu_case(backend, dtype=torch.float32, seed=70)
    with torch.no_grad(), mf.use_backend(backend):
        with tf32_settings(True, True):
            encoder(*inputs[0])
        with tf32_settings(False, False):
            out = encoder(*inputs[0])
    assert len(encoder._graphs) == 2
    oracle = reference_outputs(encoder, *inputs[0], torch.float64)
    verdict = judge(out["vision_features"], oracle["vision_features"], torch.float32, "cuda", allow_tf32=False)
    assert verdict.passed, verdict.describe()


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_graphs_on_the_last_device_while_another_is_current(backend):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    encoder = build_encoder(SMALL, seed=35, dtype=torch.bfloat16, device=device)
    encoder.cuda_graphs = True
    inputs = [make_inputs(SMALL, 2, seed=s, dtype=torch.bfloat16, device=device) for s in (36, 37)]
    with torch.cuda.device(0), torch.no_grad(), mf.use_backend(backend):
        outs = [encoder(*pair) for pair in inputs]
    for out, pair in zip(outs, inputs):
        assert out["vision_features"].device == device
        _check(out, encoder, *pair, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("backend", CUDA_FUSED_BACKENDS)
def test_gpu_forward_captured_by_the_caller_replays_correctly(backend):
    """What a caller (or torch.compile's cudagraph trees) does: capture the whole forward once,
    copy new inputs into the captured ones, replay."""
    encoder, inputs = _gpu_case(backend, seed=40)
    encoder.cuda_graphs = False
    static_pix, static_masks = (t.clone() for t in inputs[0])
    with torch.no_grad(), mf.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                encoder(static_pix, static_masks)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = encoder(static_pix, static_masks)
    for pair in inputs[1:]:
        static_pix.copy_(pair[0])
        static_masks.copy_(pair[1])
        graph.replay()
        _check(static_out, encoder, *pair, torch.bfloat16)
