"""The stand-in for QuACK that the CPU tests of vlmoe's QuACK path share (`fake_quack`).

A stand-in `quack` module computes QuACK's documented varlen semantics (its `gemm_ref`: varlen-M
with an optional row gather of A, varlen-K) in float64, so what the tests check is everything
vlmoe does around the kernel. The kernel itself is tested on the GPU (test_quack_gemm_gpu.py)."""

import dataclasses
import importlib
import itertools
import sys
import types

import pytest
import torch

from vlmoe.moe.kernels import quack_gemm

dispatch_module = importlib.import_module("vlmoe.moe.dispatch")


@dataclasses.dataclass
class _FakeGemmConfig:
    tile_m: int = 128
    tile_n: int = 192
    cluster_m: int = 2
    cluster_n: int = 1
    pingpong: bool = True
    is_dynamic_persistent: bool = False
    device_capacity: int = 9
    max_swizzle_size: int = 8


def _interleave(t):
    """QuACK's concat_layout: the non-contiguous dim's [first; second] halves read as pairs."""
    dim = -2 if t.stride(-1) == 1 else -1
    return t.unflatten(dim, (2, t.shape[dim] // 2)).transpose(dim - 1, dim).flatten(dim - 1, dim)


def _varlen_m(A, B, cu_seqlens_m, A_idx):
    """Rows of each segment (gathered by A_idx) times their group's B; rows past the end: None."""
    bounds = cu_seqlens_m.tolist()
    assert bounds[0] == 0 and cu_seqlens_m.dtype == torch.int32
    assert A_idx is None or A_idx.dtype == torch.int32
    for group, (start, end) in enumerate(itertools.pairwise(bounds)):
        rows = A[A_idx[start:end].long()] if A_idx is not None else A[start:end]
        yield slice(start, end), rows @ B[group]


class _FakeQuack:
    """QuACK's interface (gemm_tuned.fn, gemm_act) with its reference semantics in float64
    (quack.gemm_interface's gemm_ref / gemm_act_ref), recording each call as (op, tile_n,
    varlen-M, gathered)."""

    def __init__(self):
        self.calls = []
        self.concat_layouts = []
        self.configs = []

    def fn(
        self, A, B, out, cu_seqlens_m=None, cu_seqlens_k=None, A_idx=None, concat_layout=None, config=None
    ):
        self.calls.append(("gemm", config.tile_n, cu_seqlens_m is not None, A_idx is not None))
        self.configs.append(config)
        self.concat_layouts.append(concat_layout)
        concat_layout = concat_layout or ()
        assert set(concat_layout) <= {"B", "out"}
        if "B" in concat_layout:
            B = _interleave(B)
        if cu_seqlens_m is not None:
            for rows, product in _varlen_m(A, B, cu_seqlens_m, A_idx):
                out[rows] = product
            return
        bounds = cu_seqlens_k.tolist()
        assert bounds[0] == 0 and cu_seqlens_k.dtype == torch.int32
        for group, (start, end) in enumerate(itertools.pairwise(bounds)):
            columns = A[:, A_idx[start:end].long()] if A_idx is not None else A[:, start:end]
            product = columns @ B[start:end]
            if "out" in concat_layout:  # interleaved along out's non-contiguous dim, stored as halves
                dim = -2 if out.stride(-1) == 1 else -1
                pairs = torch.arange(product.shape[dim])
                product = torch.cat(
                    [product.index_select(dim, pairs[::2]), product.index_select(dim, pairs[1::2])], dim
                )
            out[group] = product

    def gemm_act(
        self, A, B, activation, preact_out, postact_out, cu_seqlens_m, A_idx, concat_layout, tuned, config
    ):
        assert activation == "swiglu" and not tuned and concat_layout == ("B",)
        self.calls.append(("gated", config.tile_n, True, A_idx is not None))
        self.configs.append(config)
        self.concat_layouts.append(concat_layout)
        for rows, preact in _varlen_m(A, _interleave(B), cu_seqlens_m, A_idx):
            preact_out[rows] = preact
            postact_out[rows] = torch.nn.functional.silu(preact[:, ::2]) * preact[:, 1::2]
        return preact_out, postact_out

    def gemm_dact(
        self, A, B, PreAct, activation, dx_out, postact_out, colvec_scale, colvec_reduce, cu_seqlens_m,
        A_idx, dynamic_scheduler, tuned, config,
    ):  # fmt: skip
        # gemm_dgated_ref: acc = A_rows @ B; (x, y) = PreAct's pairs; with dout = acc * scale,
        # dx = dout * y * silu'(x), dy = dout * silu(x); postact = silu(x) * y * scale; the
        # row reduction <acc, silu(x) * y>. All of one row's PreAct is read before its dx_out is
        # written (dx_out may be PreAct itself, as on the GPU, tile by tile).
        assert activation == "swiglu" and not tuned and not dynamic_scheduler and colvec_reduce
        self.calls.append(("dgated", config.tile_n, True, A_idx is not None))
        self.configs.append(config)
        self.concat_layouts.append(None)
        reduce = torch.empty(dx_out.shape[0], dtype=torch.float32)
        for rows, acc in _varlen_m(A, B, cu_seqlens_m, A_idx):
            gate, up = PreAct[rows, ::2].clone(), PreAct[rows, 1::2].clone()
            scale = colvec_scale[rows].to(acc.dtype).unsqueeze(-1)
            sig = torch.sigmoid(gate)
            silu = gate * sig
            dout = acc * scale
            dx_out[rows, ::2] = dout * up * sig * (1 + gate * (1 - sig))
            dx_out[rows, 1::2] = dout * silu
            postact_out[rows] = silu * up * scale
            reduce[rows] = (acc * silu * up).sum(-1).float()
        return dx_out, postact_out, reduce


@pytest.fixture
def fake_quack(monkeypatch, tmp_path):
    fake = _FakeQuack()
    package = types.ModuleType("quack")
    interface = types.ModuleType("quack.gemm_interface")
    interface.gemm_tuned = fake
    # Looked up on each call, so a test can wrap the fake's methods (compile_pool does).
    interface.gemm_act = lambda *args, **kwargs: fake.gemm_act(*args, **kwargs)
    interface.gemm_dact = lambda *args, **kwargs: fake.gemm_dact(*args, **kwargs)
    package.gemm_interface = interface
    config = types.ModuleType("quack.gemm_config")
    config.GemmConfig = _FakeGemmConfig
    for name, module in (
        ("quack", package),
        ("quack.gemm_interface", interface),
        ("quack.gemm_config", config),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    # CPU float64 operands stand in for CUDA bf16 ones; grouped_mm's place is what QuACK takes.
    monkeypatch.setattr(quack_gemm, "usable", lambda weight, x, rows=None, dtype=None: True)
    monkeypatch.setattr(dispatch_module, "_can_use_grouped_mm", lambda x, weight: True)
    monkeypatch.setattr(quack_gemm, "TUNE", False)
    # The small-experts rule off (every layer here is small): tests that want it set it.
    monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", 0)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", None)
    monkeypatch.setattr(quack_gemm, "_chosen", {})
    monkeypatch.setattr(quack_gemm, "_disk_loaded", False)
    monkeypatch.setattr(quack_gemm, "_announced", False)
    monkeypatch.setattr(quack_gemm, "_tuning_log", {})
    monkeypatch.setenv("VLMOE_CACHE_DIR", str(tmp_path))
    quack_gemm.gemm_config.cache_clear()  # configs of this fake's class only
    return fake
