"""The packed-export ops ``pack_`` / ``unpack_`` / ``dequantize_`` (SPEC.md §10): the
reference against hand-packed streams (bit order), every other backend against the
reference, bitwise, over widths x row lengths x dtypes, and the argument checks.

Without a GPU the Triton kernels run on CPU tensors under the interpreter
(``TRITON_INTERPRET=1``, set by conftest.py); every call of a case goes through
one launch.
"""

from __future__ import annotations

import os

import pytest
import torch

from parq_kernels import backends
from parq_kernels.pack_ops import dequantize, index_width, pack, packed_nbytes, unpack

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST = [b for b in ("cpu", "triton") if not backends.availability(DEVICE)[b]]
if DEVICE.type == "cpu" and INTERPRET:
    FAST.append("triton")
# (K, name): 1-bit, 2-bit, ternary (K = 3 < 2**w: codes >= K exist), 3, 4, 5 (K = 17), 8 bits
LEVEL_COUNTS = [2, 4, 3, 8, 16, 17, 256]
# (rows, cols) of the tensors of one call: single element, 7, 1023, 4097 columns, empty
SHAPES = [(1, 1), (3, 7), (1, 1023), (2, 4097), (0, 5), (4, 0)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _indices(K: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, K, s, generator=g, dtype=torch.uint8).to(DEVICE) for s in SHAPES]


def _random_streams(width: int, seed: int) -> list[torch.Tensor]:
    """Arbitrary bytes (every code, padding bits set): what a corrupted file may hold."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (packed_nbytes(r * c, width),), generator=g,
                          dtype=torch.uint8).to(DEVICE) for r, c in SHAPES]  # fmt: skip


# ---------------------------------------------------------------------------
# The reference: the stream layout itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, indices, stream",
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b10001101, 0b1]),
        (2, [2, 0, 1, 2], [0b10010010]),  # ternary codes
        (3, [1, 2, 3, 4, 5, 6, 7, 0, 5], [0xD1, 0x58, 0x1F, 0x05]),  # straddles bytes
        (4, [0xA, 0x3, 0xF], [0x3A, 0x0F]),
        (5, [31, 1], [0x3F, 0x00]),
        (8, [200, 7], [200, 7]),
    ],
)
def test_hand_packed_stream(width, indices, stream):
    """Element i holds bits [i*w, (i+1)*w), bit k is bit k % 8 of byte k // 8."""
    idx = torch.tensor(indices, dtype=torch.uint8, device=DEVICE)
    data = torch.tensor(stream, dtype=torch.uint8, device=DEVICE)
    for backend in ["reference", *FAST]:
        assert pack([idx], width, backend)[0].tolist() == stream, backend
        assert unpack([data], [len(indices)], width, backend)[0].tolist() == indices, backend


def test_width_and_size():
    assert [index_width(K) for K in (1, 2, 3, 4, 5, 8, 9, 16, 17, 256)] == [0, 1, 2, 2, 3, 3, 4,
                                                                            4, 5, 8]  # fmt: skip
    assert [packed_nbytes(n, 3) for n in (0, 1, 8, 9)] == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="K >= 1"):
        index_width(0)


def test_reference_dequantize_gathers_row_levels():
    Q = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0]])
    data = pack([torch.tensor([0, 1, 2, 2, 1, 0], dtype=torch.uint8)], 2, "reference")
    out, bad = dequantize(data, [Q], [(2, 3)], 2, backend="reference")
    assert out[0].tolist() == [[-1.0, 0.0, 1.0], [2.0, 0.0, -2.0]] and bad.tolist() == [0]
    out, bad = dequantize([torch.tensor([0b11], dtype=torch.uint8)], [Q[:1]], [(1, 1)], 2,
                          backend="reference")  # fmt: skip
    assert out[0].tolist() == [[1.0]] and bad.tolist() == [1]  # code 3 >= K: flagged, clamped


def test_width_zero_is_an_empty_stream():
    Q = torch.tensor([[0.5], [-0.25]])
    assert pack([torch.zeros(6, dtype=torch.uint8)], 0, "reference")[0].numel() == 0
    empty = torch.zeros(0, dtype=torch.uint8)
    out, _ = dequantize([empty], [Q], [(2, 3)], 0, backend="reference")
    assert out[0].tolist() == [[0.5] * 3, [-0.25] * 3]


# ---------------------------------------------------------------------------
# Every backend against the reference, bitwise
# ---------------------------------------------------------------------------


def test_fast_backends_implement_the_ops():
    for name in FAST:
        for op in ("pack_", "unpack_", "dequantize_"):
            assert callable(backends.get_impl(name, op)), (name, op)


@pytest.mark.parametrize("K", LEVEL_COUNTS)
@pytest.mark.parametrize("backend", FAST)
def test_pack_unpack_match_reference(backend, K):
    w = index_width(K)
    idx = _indices(K, seed=K)
    ref = pack(idx, w, "reference")
    got = pack(idx, w, backend)
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        assert torch.equal(r, g), f"pack, tensor {i} {SHAPES[i]}"
    streams = _random_streams(w, seed=100 + K)
    numels = [r * c for r, c in SHAPES]
    for i, (r, g) in enumerate(zip(unpack(streams, numels, w, "reference"),
                                   unpack(streams, numels, w, backend), strict=True)):  # fmt: skip
        assert torch.equal(r, g), f"unpack, tensor {i} {SHAPES[i]}"
    back = unpack(got, numels, w, backend)
    assert all(torch.equal(b.view(s), i) for b, s, i in zip(back, SHAPES, idx, strict=True))


def _check_dequantize(backend, K, levels_dtype, out_dtype, seed):
    w = index_width(K)
    g = torch.Generator().manual_seed(seed)
    streams = _random_streams(w, seed)
    levels = [(torch.randn(r, K, generator=g) * 3).to(DEVICE, levels_dtype) for r, _ in SHAPES]
    ref, ref_bad = dequantize(streams, levels, SHAPES, w, out_dtype, "reference")
    got, bad = dequantize(streams, levels, SHAPES, w, out_dtype, backend)
    for i, (r, o) in enumerate(zip(ref, got, strict=True)):
        assert o.dtype == out_dtype and torch.equal(r, o), f"tensor {i} {SHAPES[i]}"
    codes = unpack(streams, [r * c for r, c in SHAPES], w, "reference")
    assert bad.tolist() == ref_bad.tolist() == [int(bool((u.int() >= K).any())) for u in codes]
    if K == 3:  # random streams hold the code 3 somewhere in the long tensors
        assert bad[2] == bad[3] == 1


@pytest.mark.parametrize("K", LEVEL_COUNTS + [1])
@pytest.mark.parametrize("backend", FAST)
def test_dequantize_matches_reference(backend, K):
    _check_dequantize(backend, K, torch.float32, torch.float32, seed=K)


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("levels_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_dequantize_dtypes_match_reference(backend, levels_dtype, out_dtype):
    """float16 / bfloat16 levels and outputs: converted through float32 like Tensor.to."""
    _check_dequantize(backend, 3, levels_dtype, out_dtype, seed=7)


@pytest.mark.parametrize("backend", FAST)
def test_dequantize_flags_only_the_corrupted_tensor(backend):
    w = 2  # K = 3 levels
    good = pack([torch.tensor([0, 1, 2, 2, 1], dtype=torch.uint8, device=DEVICE)], w, "reference")
    corrupt = torch.tensor([0b11000000], dtype=torch.uint8, device=DEVICE)  # 4th code is 3
    levels = [torch.tensor([[-1.0, 0.0, 1.0]], device=DEVICE)] * 2
    out, bad = dequantize([good[0], corrupt], levels, [(1, 5), (1, 4)], w, backend=backend)
    assert bad.tolist() == [0, 1]
    assert out[1].tolist() == [[-1.0, -1.0, -1.0, 1.0]]  # clamped to level K - 1


# ---------------------------------------------------------------------------
# Argument checks (shared by every backend; the C++ entry points check again)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_bad_arguments_name_the_tensor(backend):
    idx = [torch.zeros(5, dtype=torch.uint8, device=DEVICE)] * 2
    short = [torch.zeros(2, dtype=torch.uint8, device=DEVICE),
             torch.zeros(1, dtype=torch.uint8, device=DEVICE)]  # fmt: skip
    with pytest.raises((ValueError, RuntimeError), match=r"packed\[1\] holds 1 bytes"):
        torch.ops.parq_kernels.pack_(idx, short, 3, backend)
    with pytest.raises((ValueError, RuntimeError), match="width must be in 0..8"):
        torch.ops.parq_kernels.unpack_(short, idx, 9, backend)
    Q = torch.zeros(2, 4, device=DEVICE)
    out = torch.empty(3, 2, device=DEVICE)
    data = torch.zeros(2, dtype=torch.uint8, device=DEVICE)
    bad = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match=r"levels\[0\] must be"):
        torch.ops.parq_kernels.dequantize_([data], [Q], [out], bad, 2, backend)


def test_cpu_entry_points_check_arguments():
    if "cpu" not in FAST or DEVICE.type != "cpu":
        pytest.skip("the cpu backend serves CPU tensors here only")
    idx = [torch.zeros(5, dtype=torch.uint8)]
    with pytest.raises(RuntimeError, match=r"packed\[0\] holds 1 bytes"):
        torch.ops.parq_kernels_C.pack_(idx, [torch.zeros(1, dtype=torch.uint8)], 2)
    with pytest.raises(RuntimeError, match=r"indices\[0\] must be a contiguous uint8"):
        torch.ops.parq_kernels_C.unpack_([torch.zeros(2, dtype=torch.uint8)],
                                         [torch.zeros(5, dtype=torch.int32)], 2)  # fmt: skip


@pytest.mark.parametrize("backend", FAST)
def test_dequantize_more_levels_than_codes(backend):
    """K > 2**w is allowed (only the first 2**w levels are reachable); nothing is flagged."""
    streams = _random_streams(8, seed=5)
    g = torch.Generator().manual_seed(5)
    levels = [torch.randn(r, 300, generator=g).to(DEVICE) for r, _ in SHAPES]
    ref, ref_bad = dequantize(streams, levels, SHAPES, 8, backend="reference")
    got, bad = dequantize(streams, levels, SHAPES, 8, backend=backend)
    assert all(torch.equal(r, o) for r, o in zip(ref, got, strict=True))
    assert bad.tolist() == ref_bad.tolist() == [0] * len(SHAPES)


def test_opcheck_schemas_and_fake_impls():
    """torch.library.opcheck: schema (mutated arguments), fake tensor impls, autograd
    registration and AOT dispatch of the three ops."""
    idx = [torch.randint(0, 4, (n,), dtype=torch.uint8) for n in (10, 7)]
    streams = [torch.empty(3, dtype=torch.uint8), torch.empty(2, dtype=torch.uint8)]
    levels = [torch.randn(2, 4), torch.randn(1, 4)]
    out = [torch.empty(2, 5), torch.empty(1, 7)]
    bad = torch.zeros(2, dtype=torch.int32)
    ops = torch.ops.parq_kernels
    cases = [
        (ops.pack_.default, (idx, streams, 2, "reference")),
        (ops.unpack_.default, (streams, idx, 2, "reference")),
        (ops.dequantize_.default, (streams, levels, out, bad, 2, "reference")),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
