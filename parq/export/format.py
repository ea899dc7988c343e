"""The packed file format (SPEC.md §10): one ``safetensors`` file.

Tensors:

* ``"<name>.qidx"``: uint8 ``(ceil(numel * w / 8),)``, the level index of every element
  of quantized parameter ``<name>`` (row-major), packed into a little-endian bit
  stream (:mod:`parq_kernels.pack_ops`);
* ``"<name>.qlevels"``: its level sets, ``(K,)`` per tensor or ``(rows, K)`` per channel
  or block (SPEC.md §2), in the file's ``levels_dtype``, sorted ascending per row;
* ``"<name>"``: every other parameter and persistent buffer, as it is.

Metadata (safetensors' string map): one entry, ``"parq"``, a JSON object
``{"format": "parq-packed", "version": 1, "levels_dtype": ..., "params": {name: entry},
"tensors": [plain names]}`` where an entry holds ``shape``, ``dtype``, ``bits``
(``quant_bits``; 0 = ternary), ``K``, ``w``, ``layout`` (``"tensor"``, ``"channel"`` or
``"block"``), ``block_size``, ``rows``, ``cols``, ``quantizer`` (its class name) and
``moved`` (the largest projection onto the levels at export; 0 for a hard-quantized
model).

:func:`read_header` parses the safetensors header itself (8-byte length + JSON; no
pickle anywhere) so that a truncated file is reported with the tensor it cuts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass

import torch

from parq_kernels.pack_ops import index_width, packed_nbytes

FORMAT = "parq-packed"
VERSION = 1
LAYOUTS = ("tensor", "channel", "block")
LEVEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors dtype codes -> bytes per element
ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                 "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                 "F64": 8}  # fmt: skip
LEVEL_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header length


class PackedFormatError(ValueError):
    """The file is not a valid packed parq file, or does not fit the model."""


@dataclass(frozen=True)
class PackedParam:
    """One quantized parameter's metadata entry (module doc)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int
    K: int
    w: int
    layout: str
    block_size: int | None
    rows: int
    cols: int
    quantizer: str = ""
    moved: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def idx_bytes(self) -> int:
        return packed_nbytes(self.numel, self.w)

    @property
    def levels_shape(self) -> tuple[int, ...]:
        return (self.K,) if self.layout == "tensor" else (self.rows, self.K)

    def to_json(self) -> dict:
        entry = asdict(self)
        del entry["name"]
        entry["shape"] = list(self.shape)
        return entry

    @classmethod
    def from_json(cls, name: str, entry: object) -> PackedParam:
        """Parse and check one entry; raises :class:`PackedFormatError` naming ``name``."""
        try:
            p = cls(name=name, shape=tuple(int(s) for s in entry["shape"]),
                    dtype=str(entry["dtype"]), bits=int(entry["bits"]), K=int(entry["K"]),
                    w=int(entry["w"]), layout=str(entry["layout"]),
                    block_size=None if entry["block_size"] is None else int(entry["block_size"]),
                    rows=int(entry["rows"]), cols=int(entry["cols"]),
                    quantizer=str(entry.get("quantizer", "")),
                    moved=float(entry.get("moved", 0.0)))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise PackedFormatError(f"parameter {name!r}: bad metadata entry ({exc!r})") from None
        p.check()
        return p

    def check(self) -> None:
        """The entry's fields agree with each other (SPEC.md §2, §10)."""
        where = f"parameter {self.name!r}"
        if not 1 <= self.K <= 256 or self.w != index_width(self.K):
            raise PackedFormatError(
                f"{where}: K={self.K} levels need w={index_width(self.K)} bits per index "
                f"(K in 1..256), metadata says w={self.w}"
            )
        if self.layout not in LAYOUTS:
            raise PackedFormatError(f"{where}: unknown layout {self.layout!r}, not in {LAYOUTS}")
        if self.rows * self.cols != self.numel or (self.layout == "tensor" and self.rows != 1):
            raise PackedFormatError(f"{where}: {self.layout} layout of {self.rows} x {self.cols} "
                                    f"does not cover shape {self.shape}")  # fmt: skip
        if self.layout == "block" and self.cols != self.block_size:
            raise PackedFormatError(f"{where}: block layout with rows of {self.cols}, "
                                    f"block size {self.block_size}")  # fmt: skip


def metadata(params: list[PackedParam], plain: list[str], levels_dtype: torch.dtype) -> dict:
    """The safetensors metadata map of a file."""
    doc = {"format": FORMAT, "version": VERSION, "levels_dtype": dtype_name(levels_dtype),
           "params": {p.name: p.to_json() for p in params}, "tensors": plain}  # fmt: skip
    # one key: safetensors keeps the metadata in a hash map, whose order varies between runs
    return {"parq": json.dumps(doc, separators=(",", ":"))}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Header:
    """A parsed file header: tensors ``{key: (dtype code, shape, (begin, end))}`` (offsets
    from ``data_start``), the parq metadata, and where the data starts."""

    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    params: dict[str, PackedParam]
    plain: list[str]
    levels_dtype: str
    data_start: int

    def nbytes(self, key: str) -> int:
        begin, end = self.tensors[key][2]
        return end - begin


def _owner(key: str) -> str:
    for suffix in (".qidx", ".qlevels"):
        if key.endswith(suffix):
            return f"parameter {key.removesuffix(suffix)!r} ({suffix[1:]})"
    return f"tensor {key!r}"


def parse_header(head: bytes, file_size: int, where: str) -> Header:
    """Parse ``head`` (at least the first ``8 + header length`` bytes of a file of
    ``file_size`` bytes); every check names what fails. Raises :class:`PackedFormatError`."""
    if file_size < 8 or len(head) < 8:
        raise PackedFormatError(f"{where}: {file_size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > file_size:
        raise PackedFormatError(
            f"{where}: truncated or not safetensors: the header claims {n} bytes, the file "
            f"holds {file_size - 8} after the length"
        )
    try:
        raw = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackedFormatError(f"{where}: unreadable safetensors header ({exc})") from None
    if not isinstance(raw, dict):
        raise PackedFormatError(f"{where}: the safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise PackedFormatError(f"{where}: the safetensors metadata is not a string map")
    if "parq" not in meta:
        raise PackedFormatError(f"{where}: not a packed parq file (no 'parq' metadata entry)")
    doc = _parq_document(meta["parq"], where)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PackedFormatError(f"{where}: format {doc.get('format')!r} version "
                                f"{doc.get('version')!r} is not supported (this parq reads "
                                f"{FORMAT!r} version {VERSION})")  # fmt: skip
    data_size = file_size - 8 - n
    tensors = {}
    for key, info in raw.items():
        try:
            code, shape = str(info["dtype"]), tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PackedFormatError(f"{where}: {_owner(key)}: bad header entry {info!r}") from None
        if end > data_size:
            raise PackedFormatError(
                f"{where}: truncated: {_owner(key)} needs bytes [{begin}, {end}) of the data, "
                f"the file holds {data_size}"
            )
        size = ELEMENT_BYTES.get(code)
        if begin > end or (size is not None and end - begin != size * math.prod(shape)):
            raise PackedFormatError(f"{where}: {_owner(key)}: {code} {list(shape)} does not "
                                    f"fit data offsets [{begin}, {end})")  # fmt: skip
        tensors[key] = (code, shape, (begin, end))
    try:
        params = {name: PackedParam.from_json(name, entry) for name, entry in
                  doc["params"].items()}  # fmt: skip
    except PackedFormatError as exc:
        raise PackedFormatError(f"{where}: {exc}") from None
    levels_dtype = doc.get("levels_dtype")
    if not isinstance(levels_dtype, str) or levels_dtype not in LEVEL_DTYPES:
        raise PackedFormatError(f"{where}: unknown levels dtype {levels_dtype!r}")
    header = Header(tensors, params, doc["tensors"], levels_dtype, 8 + n)
    check_tensors(header, where)
    return header


def _parq_document(text: object, where: str) -> dict:
    """The ``"parq"`` metadata entry parsed, with the JSON types of the module doc (``params``
    an object, ``tensors`` a list of names; both may be absent)."""
    try:
        doc = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise PackedFormatError(f"{where}: unreadable 'parq' metadata ({exc})") from None
    if not isinstance(doc, dict):
        raise PackedFormatError(f"{where}: the 'parq' metadata is not a JSON object "
                                f"(got {type(doc).__name__})")  # fmt: skip
    doc.setdefault("params", {})
    doc.setdefault("tensors", [])
    if not isinstance(doc["params"], dict):
        raise PackedFormatError(f"{where}: the 'parq' metadata's 'params' is not an object "
                                f"(got {type(doc['params']).__name__})")  # fmt: skip
    tensors = doc["tensors"]
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise PackedFormatError(f"{where}: the 'parq' metadata's 'tensors' is not a list of "
                                f"names (got {tensors!r:.80})")  # fmt: skip
    return doc


def check_tensors(h: Header, where: str) -> None:
    """Every tensor the metadata names is in the header, with the shape and dtype it needs."""
    for p in h.params.values():
        expected = [(f"{p.name}.qidx", ("U8",), (p.idx_bytes,)),
                    (f"{p.name}.qlevels", tuple(LEVEL_CODES), p.levels_shape)]  # fmt: skip
        for key, code, shape in expected:
            if key not in h.tensors:
                raise PackedFormatError(f"{where}: {_owner(key)} is missing from the file")
            got_code, got_shape, _ = h.tensors[key]
            if got_code not in code or got_shape != shape:
                raise PackedFormatError(f"{where}: {_owner(key)}: expected {'/'.join(code)} "
                                        f"{list(shape)} for {p.numel} elements, K={p.K}, "
                                        f"w={p.w}, got {got_code} {list(got_shape)}")  # fmt: skip
    for name in h.plain:
        if name not in h.tensors:
            raise PackedFormatError(f"{where}: {_owner(name)} is missing from the file")


def read_header(path: str) -> Header:
    """The parsed header of the file at ``path`` (reads only the header bytes)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER:
                head += f.read(min(n, size))
    return parse_header(head, size, str(path))
