"""SPEC.md §12, functional part: affine_quantize, qfmt_quantize, gradient_clip, and where
torch's fused fake-quantize kernels compute the formula (power-of-two deltas) or not."""

from __future__ import annotations

import pytest
import torch

from parq.fakequant import affine_quantize, gradient_clip, qfmt_quantize
from parq.fakequant.functional import fake_quantize


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_affine_quantize_hand_values():
    # delta 1, z 1, 4 levels: codes 0..3 -> values -1, 0, 1, 2; round half to even
    x = t(-2.0, -1.6, -1.0, -0.3, 0.0, 0.26, 0.5, 1.5, 2.0, 2.6, 9.0)
    want = t(-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0)
    assert torch.equal(affine_quantize(x, 1.0, 1, 4), want)
    # delta 0.5, z 0, 3 levels: 0, 0.5, 1
    assert torch.equal(affine_quantize(t(-1.0, 0.2, 0.25, 0.3, 0.75, 5.0), 0.5, 0, 3),
                       t(0.0, 0.0, 0.0, 0.5, 1.0, 1.0))  # fmt: skip


def test_affine_quantize_per_channel_tensors_broadcast():
    x = t(0.3, 0.9, -0.4, 5.0).reshape(2, 2)
    delta = t(0.5, 0.25).reshape(2, 1)
    z = t(1.0, 0.0).reshape(2, 1)
    out = affine_quantize(x, delta, z, 4)  # row 0: -0.5..1.0 step 0.5; row 1: 0..0.75
    assert torch.equal(out, t(0.5, 1.0, 0.0, 0.75).reshape(2, 2))


def test_qfmt_quantize_hand_values_and_clamp():
    x = t(-5.0, -1.26, 0.124, 0.13, 3.0)
    # delta 0.25, codes [-8, 7]: -2 .. 1.75
    assert torch.equal(qfmt_quantize(x, 0.25, -8, 7), t(-2.0, -1.25, 0.0, 0.25, 1.75))
    # a non-power-of-two delta takes the composed path, same formula
    assert torch.equal(qfmt_quantize(t(0.29, 0.31, 10.0), 0.3, 0, 3), t(1.0, 1.0, 3.0) * 0.3)


@pytest.mark.parametrize("fn", ["affine", "qfmt"])
def test_straight_through_gradient_is_identity(fn):
    x = torch.linspace(-4, 4, 41, requires_grad=True)
    y = affine_quantize(x, 0.5, 2, 4) if fn == "affine" else qfmt_quantize(x, 0.5, -2, 1)
    g = torch.randn(41)
    y.backward(g)
    assert torch.equal(x.grad, g)  # also where the clamp is active


def test_gradient_clip_masks_outside_the_closed_range():
    x = t(-2.0, -1.0, -0.5, 0.0, 1.0, 1.0001, 3.0).requires_grad_()
    y = gradient_clip(x, -1.0, 1.0)
    assert torch.equal(y, x)
    y.backward(torch.full((7,), 2.0))
    assert torch.equal(x.grad, t(0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0))


def test_fake_quantize_clip_masks_to_the_level_range():
    # delta 0.5, z 1, codes 0..3: levels -0.5 .. 1.0; the mask is on x, not on the codes
    x = t(-0.75, -0.6, -0.5, 0.2, 1.0, 1.1, 1.3).requires_grad_()
    y = fake_quantize(x, torch.tensor(0.5), torch.tensor(1.0), 0, 3, clip=True)
    assert torch.equal(y, t(-0.5, -0.5, -0.5, 0.0, 1.0, 1.0, 1.5 - 0.5))
    y.sum().backward()
    assert torch.equal(x.grad, t(0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0))


def test_per_channel_clip_mask_along_axis0():
    x = t(0.9, 1.1, 0.9, 1.1).reshape(2, 2).requires_grad_()
    delta, z = t(0.25, 0.5), t(0.0, 0.0)  # highest levels 0.75 and 1.5
    y = fake_quantize(x, delta, z, 0, 3, clip=True, axis=0)
    y.sum().backward()
    assert torch.equal(x.grad, t(0.0, 0.0, 1.0, 1.0).reshape(2, 2))


def test_torch_kernel_is_exact_for_power_of_two_deltas():
    """With delta = 2^-k, torch.fake_quantize_per_*_affine equal the composed formula
    bit for bit (the reciprocal is exact), per tensor and per channel."""
    x = torch.randn(64, 4096) * 3
    for k in (-3, 0, 4, 7, 20):
        d = torch.tensor(2.0**-k)
        kernel = fake_quantize(x, d, torch.tensor(0.0), -128, 127, pow2=True, kernel=True)
        composed = fake_quantize(x, d, torch.tensor(0.0), -128, 127, pow2=True, kernel=False)
        assert torch.equal(kernel, composed), k
    d = torch.exp2(-torch.randint(-2, 10, (64,)).float())
    z = torch.zeros(64)
    kernel = fake_quantize(x, d, z, 0, 15, pow2=True, axis=0, kernel=True)
    assert torch.equal(kernel, fake_quantize(x, d, z, 0, 15, pow2=True, axis=0, kernel=False))
    # and through the straight-through function: the identity gradient, not the kernel's mask
    xg = x.clone().requires_grad_()
    fake_quantize(xg, d, z, 0, 15, pow2=True, axis=0, kernel=True).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="kernel=True needs pow2=True"):
        fake_quantize(x, d, z, 0, 15, axis=0, kernel=True)


def test_torch_kernel_differs_for_general_deltas_so_affine_composes():
    """torch's kernel rounds x * (1/s) with a float32 reciprocal: near a half-step some
    elements land on the neighbouring level; affine_quantize follows SPEC (x / delta)."""
    s = torch.tensor(0.1)
    k = torch.arange(-100, 100).float()
    mid = (k + 0.5) * s  # values on and next to the half-steps
    x = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    z = 128
    ours = affine_quantize(x, s, z, 256)
    spec = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
    assert torch.equal(ours, spec)
    zt = torch.tensor(z, dtype=torch.int32)
    theirs = torch.fake_quantize_per_tensor_affine(x, s, zt, 0, 255)
    differ = theirs != spec
    assert differ.any()  # e.g. x = -9.15 (float32 -9.149999...): code -91 here, -92 there
    assert torch.allclose(theirs[differ], spec[differ], atol=s.item() * 1.0001, rtol=0)
    one = torch.tensor([-9.149999618530273])
    assert affine_quantize(one, s, z, 256).item() == pytest.approx(-9.1, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_keep_their_dtype(dtype):
    x = torch.linspace(-2, 2, 17, dtype=dtype, requires_grad=True)
    y = qfmt_quantize(x, 0.25, -4, 3)
    assert y.dtype == dtype
    want = torch.clamp(torch.round(x.detach().double() / 0.25), -4, 3) * 0.25
    assert torch.equal(y.double(), want)
    y.sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.ones_like(x))


def test_empty_input():
    x = torch.empty(0, 3)
    assert affine_quantize(x, 0.1, 0, 16).shape == (0, 3)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: affine_quantize(x, 0.1, 0, 1), ValueError, "n_levels must be >= 2"),
        (lambda x: affine_quantize(x, 0.1, 0, 4.0), TypeError, "n_levels must be an int"),
        (lambda x: affine_quantize(x, 0.0, 0, 4), ValueError, "delta must be finite and > 0"),
        (lambda x: affine_quantize(x, float("nan"), 0, 4), ValueError, "delta must be finite"),
        (lambda x: affine_quantize(x, "0.1", 0, 4), TypeError, "delta must be a float"),
        (lambda x: affine_quantize(x, 0.1, 0.5, 4), TypeError, "zero_point must be an int"),
        (lambda x: affine_quantize(x, torch.tensor(1), 0, 4), TypeError, "delta must be a float"),
        (lambda x: qfmt_quantize(x, 0.5, 3, 2), ValueError, r"min_int \(3\) must be <= max_int"),
        (lambda x: qfmt_quantize(x, 0.5, True, 2), TypeError, "min_int must be an int"),
        (lambda x: gradient_clip(x, 1.0, -1.0), ValueError, "lo <= hi"),
        (lambda x: gradient_clip(x, None, 1.0), TypeError, "lo must be a number"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4))
