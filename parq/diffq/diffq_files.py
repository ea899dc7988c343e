"""Quantized states written by the public ``diffq`` 0.2.x (``get_quantized_state``), read
without it (SPEC.md §11; diffq is CC-BY-NC: its layout is described here, no code of it).

A diffq state is a dict ``{"quantized", "float16", "others", "meta"}`` (no ``"format"`` key,
which tells it from this package's own states). ``meta`` holds ``klass`` (the quantizer
class, pickled by reference as ``diffq.diffq.DiffQuantizer`` etc.), ``init_kwargs`` (only the
constructor arguments the user passed), ``packed`` and ``torch_pack``. The parameters are
listed in diffq's order: ``model.named_modules()``, each module's own parameters, full name
``f"{module}.{name}"`` (``".weight"`` at the root) matched by the ``exclude`` patterns;
those of at most ``min_size * 2**20 // 4`` elements or excluded go to ``float16`` (half
tensors, when ``float16``) or ``others`` (as they are); a parameter met again is skipped
(``detect_bound``). ``quantized`` holds one tuple per first appearance of the others:

* ``UniformQuantizer``: ``(levels, (mn, mx))``, ``w = levels * (1 / (2^bits - 1)) *
  (mx - mn) + mn`` in float32, ``mn`` / ``mx`` Python floats;
* ``DiffQuantizer``: ``(levels (groups, G), (mn, mx), bits (groups,) uint8)``, the same
  formula with each group's bits; packed ``([one stream per bits 1..14 or None], (mn, mx),
  stream of bits - min_bits)``: levels of the groups of ``b`` bits in element order (levels
  of 15-bit groups are not written: such a file cannot be restored);
* ``LSQ``: ``(index int16, step)``, ``w = index * step``; packed, the stream holds
  ``index + 2^(bits-1)``.

A stream (``bitpack.pack``) is int64 ``(lines, nbits, block)``: bit ``k`` of element
``line * 64 * block + j * block + i`` is bit ``j`` of ``[line, k, i]`` (``block`` = 32, zero
padding to whole lines); with ``torch_pack`` it is ``(nbits, cols)`` of an integer dtype of
``S`` bits, bit ``k`` of element ``j * cols + c`` being bit ``j`` of ``[k, c]``. Every entry
is decoded and checked before any weight is written, so a bad state leaves the model as it
was.
"""

from __future__ import annotations

import math
import numbers
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from parq.diffq.diffq import DiffQuantizer
from parq.diffq.lsq import LSQ
from parq.diffq.uniform import UniformQuantizer

COMMON = {"min_size": 0.01, "float16": False, "exclude": [], "detect_bound": True}
DEFAULTS = {  # diffq 0.2.4's constructor defaults, by class name
    "DiffQuantizer": {"group_size": 1, "min_bits": 2, "max_bits": 15, "param": "bits",
                      "noise": "gaussian", "init_bits": 8, "extra_bits": 0,
                      "suffix": "_diffq"},
    "UniformQuantizer": {"bits": 8.0, "qat": False},
    "LSQ": {"bits": 8, "suffix": "_lsq"},
}  # fmt: skip
PICKLED_AS = {"diffq.diffq.DiffQuantizer": DiffQuantizer, "diffq.lsq.LSQ": LSQ,
              "diffq.uniform.UniformQuantizer": UniformQuantizer}  # fmt: skip
TORCH_PACK_BITS = {torch.uint8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}


def is_diffq_state(state: object) -> bool:
    """Whether ``state`` is laid out as diffq writes it (a dict with ``meta``, no ``format``)."""
    return isinstance(state, dict) and "meta" in state and "format" not in state


def load_diffq_state(f, map_location=None) -> object:
    """``torch.load`` of a file holding diffq states, with ``weights_only=True`` and without
    diffq: its quantizer classes load as this package's classes of the same name."""
    globs = [(cls, path) for path, cls in PICKLED_AS.items()]
    with torch.serialization.safe_globals(globs):
        return torch.load(f, map_location=map_location, weights_only=True)


class _Fail(ValueError):
    pass


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise _Fail(msg)


def _layout(model: nn.Module, kw: dict) -> tuple[list, list, list]:
    """``(quantized, float16, others)``: ``(full name, parameter)`` in diffq's order."""
    min_params = kw["min_size"] * 2**20 // 4
    quantized, half, others = [], [], []
    seen: dict[int, bool] = {}  # True: quantized
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{name}"
            excluded = any(fnmatch(full, pat) or fnmatch(name, pat) for pat in kw["exclude"])
            if p.numel() <= min_params or excluded:
                if id(p) in seen:
                    continue
                if kw["detect_bound"]:
                    seen[id(p)] = False
                (half if kw["float16"] else others).append((full.lstrip("."), p))
            else:
                if not seen.get(id(p), False):
                    quantized.append((full.lstrip("."), p))
                if kw["detect_bound"]:
                    seen[id(p)] = True
    return quantized, half, others


def _unpack(data: object, count: int, torch_pack: bool, what: str,
            planes: int | None = None) -> Tensor:  # fmt: skip
    """The ``count`` int32 values of a packed stream (module doc) of ``planes`` bits (any up
    to 16 when ``None``); its size and its zero padding checked."""
    _check(isinstance(data, Tensor), f"{what}: expected a packed tensor, got "
           f"{type(data).__name__}")  # fmt: skip
    data = data.detach().cpu()
    if torch_pack:
        store = TORCH_PACK_BITS.get(data.dtype)
        _check(store is not None and data.dim() == 2, f"{what}: expected a 2-D integer "
               f"tensor (torch_pack), got {data.dtype} {tuple(data.shape)}")  # fmt: skip
        nbits, cols = data.shape
        _check(cols == math.ceil(count / store) and 0 <= nbits <= 16, f"{what}: {nbits} x "
               f"{cols} words of {store} bits for {count} values (truncated or another "
               "model's)")  # fmt: skip
        shifts = torch.arange(store, dtype=torch.int64)
        bits = (data.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 1
        weights = (1 << torch.arange(nbits, dtype=torch.int64))[:, None, None]
        out = (bits * weights).sum(0).to(torch.int32)
    else:
        _check(data.dtype == torch.int64 and data.dim() == 3, f"{what}: expected an int64 "
               f"(lines, bits, block) tensor, got {data.dtype} {tuple(data.shape)}")  # fmt: skip
        lines, nbits, block = data.shape
        _check(block > 0 and lines == math.ceil(count / (64 * block)) and nbits <= 16,
               f"{what}: {lines} lines of {nbits} x {block} words for {count} values "
               "(truncated or another model's)")  # fmt: skip
        out = torch.zeros(lines, 64, block, dtype=torch.int32)
        shifts = torch.arange(64, dtype=torch.int64)[None, :, None]
        step = max(1, 2**22 // (64 * block))  # lines per chunk: int64 temporaries of 32 MiB
        for lo in range(0, lines, step):
            for k in range(nbits):
                plane = data[lo : lo + step, k, None, :]
                out[lo : lo + step] |= ((plane >> shifts) & 1).to(torch.int32) << k
    _check(planes is None or nbits == planes, f"{what}: {nbits} bit planes, expected {planes}")
    out = out.reshape(-1)
    _check(not bool(out[count:].any()), f"{what}: nonzero values past the {count} expected "
           "(another model's state?)")  # fmt: skip
    return out[:count]


def _scales(value: object, what: str) -> tuple[float, float]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    _check(ok, f"{what}: expected (min, max) numbers, got {value!r}")
    return float(value[0]), float(value[1])


def _levels(value: object, shape: tuple, what: str) -> Tensor:
    ok = isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex()
    _check(ok and tuple(value.shape) == shape, f"{what}: expected integer levels of shape "
           f"{shape}, got {getattr(value, 'dtype', type(value).__name__)} "
           f"{tuple(getattr(value, 'shape', ()))}")  # fmt: skip
    return value.detach().cpu()


def _minmax_weights(levels: Tensor, scales: tuple[float, float], bits: Tensor) -> Tensor:
    """diffq's float32 dequantization, op for op (so the result is bit-identical)."""
    mn, mx = scales
    unit = 1 / (2 ** bits.float() - 1)
    return levels.float() * unit * (mx - mn) + mn


def _diffq_weights(entry: tuple, p: Tensor, kw: dict, meta: dict, what: str) -> Tensor:
    group = kw["group_size"]
    _check(isinstance(group, int) and group >= 0, f"init_kwargs: bad group_size {group!r}")
    _check(group == 0 or p.numel() % group == 0, f"{what}: group_size {group} does not divide "
           f"its {p.numel()} elements (another model's state?)")  # fmt: skip
    groups, size = (p.numel() // group, group) if group else (1, p.numel())
    scales = _scales(entry[1], f"{what} (min, max)")
    if not meta["packed"]:
        levels = _levels(entry[0], (groups, size), f"{what} levels")
        bits = _levels(entry[2], (groups,), f"{what} bits")
    else:
        streams, tp = entry[0], meta["torch_pack"]
        _check(isinstance(streams, (list, tuple)) and len(streams) == 14, f"{what}: expected "
               "a list of 14 level streams (bits 1..14)")  # fmt: skip
        bits = _unpack(entry[2], groups, tp, f"{what} bits") + kw["min_bits"]
        n15 = int((bits == 15).sum())
        _check(n15 == 0, f"{what}: {n15} groups of 15 bits, whose levels diffq 0.2.x does "
               "not write: this file cannot restore them")  # fmt: skip
        levels = torch.zeros(groups, size, dtype=torch.int32)
        for b, data in enumerate(streams, start=1):
            mask = bits == b
            count = int(mask.sum()) * size
            _check((data is None) == (count == 0), f"{what}: the {b}-bit level stream is "
                   f"{'missing' if data is None else 'present'} for {count} values")  # fmt: skip
            if count:
                stream = _unpack(data, count, tp, f"{what} {b}-bit levels", planes=b)
                levels[mask] = stream.view(-1, size)
    _check(bool(((bits >= 1) & (bits <= 15)).all()), f"{what}: bits outside 1..15")
    return _minmax_weights(levels, scales, bits.reshape(-1, 1))


def _entry_weights(name: str, entry: object, p: Tensor, kw: dict, meta: dict,
                   what: str) -> Tensor:  # fmt: skip
    """The float32 weights of one quantized entry, shaped like ``p``."""
    arity = 3 if name == "DiffQuantizer" else 2
    ok = isinstance(entry, (tuple, list)) and len(entry) == arity
    got = f"{len(entry)} items" if isinstance(entry, (tuple, list)) else type(entry).__name__
    _check(ok, f"{what}: expected a tuple of {arity} for {name}, got {got}")
    if name == "DiffQuantizer":
        return _diffq_weights(entry, p, kw, meta, what).view(p.shape)
    shape, bits = tuple(p.shape), kw["bits"]
    if meta["packed"]:
        planes = int(bits) if name == "UniformQuantizer" and bits == int(bits) else None
        levels = _unpack(entry[0], p.numel(), meta["torch_pack"], f"{what} levels", planes)
        levels = levels.view(shape)
    else:
        levels = _levels(entry[0], shape, f"{what} levels")
    if name == "UniformQuantizer":
        scales = _scales(entry[1], f"{what} (min, max)")
        return _minmax_weights(levels, scales, torch.tensor(float(bits)))
    step = entry[1]
    _check(isinstance(step, Tensor) and step.numel() == 1 and step.is_floating_point(),
           f"{what}: expected a 1-element float step, got {step!r}")  # fmt: skip
    if meta["packed"]:
        levels = levels - 2 ** (bits - 1)
    return levels.float() * step.detach().cpu()


def _meta(state: dict) -> tuple[str, dict, dict]:
    """``(class name, constructor arguments with diffq's defaults, meta)``."""
    for key in ("quantized", "float16", "others", "meta"):
        _check(key in state, f"no {key!r} entry")
    meta = state["meta"]
    _check(isinstance(meta, dict) and "klass" in meta and "init_kwargs" in meta,
           "'meta' must be a dict with 'klass' and 'init_kwargs'")  # fmt: skip
    klass = meta["klass"]
    name = klass if isinstance(klass, str) else getattr(klass, "__name__", repr(klass))
    _check(name in DEFAULTS, f"unknown quantizer {name!r}; expected one of {list(DEFAULTS)}")
    given = meta["init_kwargs"]
    _check(isinstance(given, dict), "'meta' 'init_kwargs' must be a dict")
    kw = {**COMMON, **DEFAULTS[name]}
    unknown = sorted(set(given) - set(kw))
    _check(not unknown, f"unknown {name} arguments {unknown}")
    kw.update(given)
    kw["exclude"] = list(kw["exclude"] or [])
    for key in ("min_size", "bits", "min_bits"):
        value = kw.get(key, 0)
        _check(isinstance(value, numbers.Real) and not isinstance(value, bool),
               f"init_kwargs: {key} must be a number, got {value!r}")  # fmt: skip
    _check(all(isinstance(e, str) for e in kw["exclude"]), "init_kwargs: exclude must be "
           "a list of patterns")  # fmt: skip
    flags = {"packed": bool(meta.get("packed", False)),
             "torch_pack": bool(meta.get("torch_pack", False))}  # fmt: skip
    return name, kw, flags


def restore_diffq_state(model: nn.Module, state: dict) -> None:
    """Write the weights of a diffq 0.2.x state into ``model`` (bit-identical to diffq's
    ``restore_quantized_state``); ``ValueError`` naming what is wrong, model unchanged."""
    try:
        name, kw, meta = _meta(state)
        quantized, half, others = _layout(model, kw)
        writes = []
        for key, params in (("quantized", quantized), ("float16", half), ("others", others)):
            values = state[key]
            _check(isinstance(values, (list, tuple)) and len(values) == len(params),
                   f"{key!r} holds {len(values) if isinstance(values, (list, tuple)) else '?'} "
                   f"entries, the model {len(params)} with these arguments (another "
                   "model's state?)")  # fmt: skip
            for i, ((full, p), value) in enumerate(zip(params, values, strict=True)):
                what = f"{key}[{i}] ({full})"
                if key == "quantized":
                    value = _entry_weights(name, value, p, kw, meta, what)
                else:
                    _check(isinstance(value, Tensor) and value.shape == p.shape,
                           f"{what}: expected a tensor of shape {tuple(p.shape)}, got "
                           f"{tuple(getattr(value, 'shape', ()))}")  # fmt: skip
                writes.append((p, value))
    except _Fail as exc:
        raise ValueError(f"diffq state: {exc}") from None
    with torch.no_grad():
        for p, value in writes:
            p.copy_(value.to(device=p.device, dtype=p.dtype))
