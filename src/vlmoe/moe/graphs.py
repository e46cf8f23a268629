"""CUDA graphs of a sparse layer's inference forward at decoding sizes.

Eager decoding at one token per sequence is bound by the host, not the GPU: an MoE FFN's
forward there is 130-150 us of Python and a few Triton launches for ~60 us of GPU work
(`benchmarks/decode_diagnosis.py`). `ForwardGraphs` captures the forward once per input
signature (the second time it sees one) and then runs it as one copy in, one graph replay and
one copy out: 66 us a forward on the H200 (`benchmarks/decode_layer.py`, NOTES.md v20).

The protocol that makes one memory pool safe for every graph: a call writes the static input,
replays and clones the static output before any other graph runs, so nothing a graph leaves in
the pool outlives its own call. A lock keeps threads' calls apart on the host, and a call on
another stream than the last one waits for that stream first, so they stay apart on the GPU.
The caller's key must change whenever the captured work would: the inputs' shapes, dtypes and
devices (added here), and whatever the caller's forward reads besides its inputs (parameter
addresses, settings). Tensors that change from call to call at the same shape (MoCLE's cluster
ids) are static inputs of their own (`extra`), copied in like x.

`ENABLED` (env `VLMOE_CUDA_GRAPHS=0` to turn off) is read on every call.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

ENABLED = os.environ.get("VLMOE_CUDA_GRAPHS", "1") != "0"
# Tokens per decoding step up to which a layer replays graphs (a batch of 256 sequences);
# larger steps are bound by the GPU, not by the host.
MAX_TOKENS = 256
# Graphs kept per layer: decoding sees one size per batch size.
MAX_GRAPHS = 16
# Keys seen once and not captured yet, per layer: a size is captured when it comes back (every
# decoding step of a batch has the same size; a one-off size is not worth a capture).
_MAX_SEEN = 64

_side: dict[int, tuple[tuple[int, int], torch.cuda.Stream, torch.cuda.CUDAGraph]] = {}


def _pool_and_stream(device: torch.device) -> tuple[tuple[int, int], torch.cuda.Stream]:
    """Per GPU: one memory pool, shared by every layer's graphs (see the module note), and the
    side stream that warms and captures them. The pool's first graph is a one-op graph kept
    forever: torch's device and pinned-host allocators both drop a pool whose last graph is
    gone, and a later capture into the same handle then fails their internal asserts."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side:
        with torch.cuda.device(index):
            pool, stream, keeper = torch.cuda.graph_pool_handle(), torch.cuda.Stream(), torch.cuda.CUDAGraph()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                keeper.capture_begin(pool=pool, capture_error_mode="thread_local")
                torch.zeros(1, device=f"cuda:{index}")
                keeper.capture_end()
            _side[index] = (pool, stream, keeper)
    pool, stream, _ = _side[index]
    return pool, stream


_replay_lock = threading.RLock()  # reentrant: a capture inside it must not deadlock
_last_stream: dict[int, torch.cuda.Stream] = {}


def _follow_the_last_stream(device: torch.device) -> torch.cuda.Stream:
    """Order this call's replay after the last one, when that ran on another stream: graphs
    share scratch memory, so two replays must never run at once on the GPU. -> this stream."""
    stream = torch.cuda.current_stream(device)
    last = _last_stream.get(stream.device_index)
    if last is not None and last != stream:
        stream.wait_event(last.record_event())  # after everything queued there so far
    _last_stream[stream.device_index] = stream
    return stream


_caches: weakref.WeakSet[ForwardGraphs] = weakref.WeakSet()


def release() -> None:
    """Drop every layer's graphs and the shared pools, so `torch.cuda.empty_cache()` can return
    their memory (tens of MB for a 12-layer model); layers capture again when they next decode.

    Example:
        >>> release()  # nothing captured on a CPU: a no-op
    """
    with _replay_lock:
        for index in _side:
            torch.cuda.synchronize(index)  # no replay may still read what is freed here
        for cache in list(_caches):
            cache.clear()
        _side.clear()  # the keepers go: each pool is freed with its last graph
        _last_stream.clear()


def can_capture(x: Tensor) -> bool:
    """Whether a call on x may take the graph path: CUDA, autograd off, and neither inside
    torch.compile's tracing nor inside a capture of the caller's own (both would capture us).

    Example:
        >>> can_capture(torch.zeros(2))  # a CPU tensor: the eager path
        False
    """
    return (
        ENABLED
        and x.is_cuda
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def address(tensor: Tensor) -> tuple:
    """A tensor's part of a graph key: a replay reads this memory, so a new address (a replaced
    parameter) must mean a new graph, while writes in place are read as they are.

    Example:
        >>> weight = torch.zeros(2, 3)
        >>> address(weight) == (weight.data_ptr(), torch.Size([2, 3]), torch.float32)
        True
    """
    return tensor.data_ptr(), tensor.shape, tensor.dtype


def parameter_addresses(module: torch.nn.Module) -> tuple:
    """`address` of every parameter of module and its submodules: a layer's part of a graph key.
    A plain walk of `_modules`: `module.parameters()` costs 3x the host time (33 against 12 us
    for a LoRA-expert feed-forward, on every decoding step of every layer).

    Example:
        >>> linear = torch.nn.Linear(3, 2)
        >>> parameter_addresses(torch.nn.Sequential(linear)) == (address(linear.weight), address(linear.bias))
        True
    """
    found = []
    stack = [module]
    while stack:
        current = stack.pop()
        parameters = current._parameters.values()
        found.extend(address(parameter) for parameter in parameters if parameter is not None)
        stack.extend(child for child in reversed(current._modules.values()) if child is not None)
    return tuple(found)


@dataclass
class _Graph:
    replay: Callable[[], None]  # the captured CUDAGraph's replay (it keeps the graph alive)
    static_inputs: tuple[Tensor, ...]  # x, then the extra inputs
    static_output: Tensor
    stream: torch.cuda.Stream | None = None  # the CUDA stream the static inputs were made on


def _record(
    forward: Callable[..., Tensor], static_inputs: tuple[Tensor, ...]
) -> tuple[Callable[[], None], Tensor]:
    """Capture forward(*static_inputs) as a CUDA graph: its replay and its static output."""
    device = static_inputs[0].device
    pool, stream = _pool_and_stream(device)
    graph = torch.cuda.CUDAGraph()
    # Warm on the capture's stream first, as torch's CUDA-graph notes ask: a library's
    # per-stream state (a matmul workspace) is then made outside the capture. capture_begin
    # rather than torch.cuda.graph, whose synchronize and empty_cache would cost every layer's
    # first decoding step a device-wide stall and the allocator its cached blocks.
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward(*static_inputs)
        try:
            # thread_local: another thread's unrelated CUDA calls do not invalidate the capture.
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            static_output = forward(*static_inputs)
        except BaseException as error:
            with contextlib.suppress(RuntimeError):  # an invalid capture: the forward's error says why
                graph.capture_end()
            shape = tuple(static_inputs[0].shape)
            raise RuntimeError(
                f"capturing a CUDA graph of a forward on input {shape} failed: {error}. "
                "Set vlmoe.moe.graphs.ENABLED = False (or VLMOE_CUDA_GRAPHS=0) to run it eagerly."
            ) from error
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay, static_output


class ForwardGraphs:
    """Captured graphs of one function of one tensor (and of `extra` tensors), keyed by the caller.

    On a GPU, under torch.no_grad(): `graphs.run(lambda x: (x @ weight).relu(), x, key=(weight.data_ptr(),))`
    runs eagerly the first time a key (with x's shape, dtype and device) is seen, captures and
    replays the second time, and replays from then on. Ask `can_capture(x)` first.
    """

    def __init__(self, max_graphs: int = MAX_GRAPHS) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: set[Hashable] = set()
        _caches.add(self)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def run(
        self, forward: Callable[..., Tensor], x: Tensor, key: Hashable, extra: tuple[Tensor, ...] = ()
    ) -> Tensor:
        """forward(x, *extra), replayed from a graph once this key and the inputs' shapes,
        dtypes and devices have come twice; the result is a fresh tensor either way. `extra`:
        tensors on x's device that the forward reads and that may change from call to call."""
        inputs = (x, *extra)
        signature = tuple((t.shape, t.dtype, t.device) for t in inputs)
        # Inference mode apart: a static input made in it cannot be written outside it.
        full_key = (key, signature, torch.is_inference_mode_enabled())
        # One thread at a time from the lookup to the copy out: the static tensors are each
        # graph's own, the pool's scratch memory is every graph's, and the cache is shared.
        with _replay_lock:
            entry = self._graphs.get(full_key)
            if entry is None and full_key in self._seen:
                self._seen.discard(full_key)
                entry = self._capture(forward, inputs, full_key)
            if entry is not None:
                if x.is_cuda:
                    stream = _follow_the_last_stream(x.device)
                    if stream != entry.stream:
                        # Freed with the graph, the static tensors must wait for this stream's
                        # use too, not only for the one they were made on.
                        for static in (*entry.static_inputs, entry.static_output):
                            static.record_stream(stream)
                for static, given in zip(entry.static_inputs, inputs, strict=True):
                    static.copy_(given)
                entry.replay()
                return entry.static_output.clone()
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            self._seen.add(full_key)
        return forward(*inputs)  # the first sight: kernels compile and caches fill here, before a capture

    def _capture(
        self, forward: Callable[..., Tensor], inputs: tuple[Tensor, ...], full_key: Hashable
    ) -> _Graph:
        static_inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs)
        for static, given in zip(static_inputs, inputs, strict=True):
            static.copy_(given)
        replay, static_output = _record(forward, static_inputs)
        x = inputs[0]
        stream = torch.cuda.current_stream(x.device) if x.is_cuda else None
        entry = self._graphs[full_key] = _Graph(replay, static_inputs, static_output, stream)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    # Graphs hold raw device addresses: a copy or a pickle starts with none and captures anew.
    def __deepcopy__(self, memo: dict) -> ForwardGraphs:
        return ForwardGraphs(self.max_graphs)

    def __reduce__(self) -> tuple:
        return (ForwardGraphs, (self.max_graphs,))
