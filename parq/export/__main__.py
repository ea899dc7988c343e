"""``python -m parq.export report FILE [--json]``: the size report of a packed file
written by :func:`parq.export.save_quantized` (SPEC.md §10); ``info FILE`` lists its
quantized parameters' metadata."""

from __future__ import annotations

import argparse
import json
import sys

from parq.export.format import PackedFormatError, read_header
from parq.export.size_report import report_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m parq.export",
        description="Inspect a packed low-bit parq file (safetensors) written by "
        "parq.export.save_quantized.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="sizes: dense, packed, bits per weight, zlib")
    report.add_argument("file", help="the .safetensors file")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    info = sub.add_parser("info", help="format version and each quantized parameter's metadata")
    info.add_argument("file", help="the .safetensors file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "report":
            report = report_file(args.file)
            print(json.dumps(report.as_dict(), indent=2) if args.json else report)
        else:
            header = read_header(args.file)
            print(
                f"{args.file}: parq packed file, levels {header.levels_dtype}, "
                f"{len(header.params)} quantized parameters, {len(header.plain)} other tensors"
            )
            for p in header.params.values():
                block = f" block {p.block_size}" if p.layout == "block" else ""
                print(f"  {p.name}: {p.dtype} {list(p.shape)}, {p.layout}{block} "
                      f"({p.rows} x {p.cols}), bits {p.bits}, K {p.K}, w {p.w}, "
                      f"{p.quantizer or '?'}, moved {p.moved:.4g}")  # fmt: skip
    except (OSError, PackedFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
