"""Stand-ins for the CUDA libraries that the aarch64 torch wheel (a CUDA 13 build) links
against, so that torch loads on a CPU-only, emulated machine (check.sh). Every function
fails with status 100 (cudaErrorNoDevice); the *ErrorString-like ones return a string;
the kernel registrations that run when a library loads succeed and do nothing.

    python3 cuda_stubs.py DIR   (DIR/missingv.txt: the symbols, name@version, one per
                                 line; writes DIR/src/<soname>.c and DIR/lib/<soname>)
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

SONAMES = [
    "libcudart.so.13", "libcupti.so.13", "libcusparse.so.12", "libcufft.so.12",
    "libcufile.so.0", "libcusparseLt.so.0", "libnccl.so.2", "libcurand.so.10",
    "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9", "libnvrtc.so.13",
    "libnvshmem_host.so.3", "libcusolver.so.12", "libcuda.so.1",
]  # fmt: skip
VERSION_SONAME = {"NVSHMEM": "libnvshmem_host.so.3"}  # a symbol version that is no soname
UNVERSIONED = [("cuFile", "libcufile.so.0"), ("cusparseLt", "libcusparseLt.so.0"),
               ("nccl", "libnccl.so.2"), ("cu", "libcuda.so.1")]  # fmt: skip
MESSAGE = '"CUDA stand-in: no CUDA libraries on this machine"'


def soname(sym: str, version: str) -> str:
    if version:
        return VERSION_SONAME.get(version, version)
    for prefix, lib in UNVERSIONED:
        if sym.startswith(prefix):
            return lib
    sys.exit(f"cuda_stubs: no library for {sym}")


def body(sym: str) -> str:
    if sym in ("cuGetErrorString", "cuptiGetResultString"):
        return f"int {sym}(int e, const char **s) {{ if (s) *s = {MESSAGE}; return 0; }}"
    if sym.endswith(("ErrorString", "ErrorName")) or sym == "ncclGetLastError":
        return f"const char *{sym}(void) {{ return {MESSAGE}; }}"
    if sym == "cudnnGetLastErrorString":
        return f"void {sym}(char *m, unsigned long n) {{ if (m && n) m[0] = 0; }}"
    if sym == "__cudaRegisterFatBinary":
        return f"static void *handle[8]; void **{sym}(void *f) {{ return handle; }}"
    if sym.startswith("__cuda"):  # registrations when a library loads: succeed
        return f"long {sym}(void) {{ return 0; }}"
    return f"long {sym}(void) {{ return 100; }}"


def main(out: str) -> None:
    by_lib: dict[str, dict[str, str]] = collections.defaultdict(dict)
    with open(os.path.join(out, "missingv.txt")) as f:
        for line in f:
            sym, _, version = line.strip().partition("@")
            by_lib[soname(sym, version)][sym] = version
    os.makedirs(os.path.join(out, "src"), exist_ok=True)
    os.makedirs(os.path.join(out, "lib"), exist_ok=True)
    cc = os.environ.get("CC", "aarch64-linux-gnu-gcc")
    for lib in SONAMES:
        syms = by_lib.get(lib, {})
        c = os.path.join(out, "src", lib + ".c")
        with open(c, "w") as f:
            f.write("\n".join(body(s) for s in sorted(syms)) + "\n")
        cmd = [cc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{lib}", c]
        versions = sorted({v for v in syms.values() if v})
        if versions:
            assert len(versions) == 1, (lib, versions)
            script = os.path.join(out, "src", lib + ".map")
            with open(script, "w") as f:
                f.write(f"{versions[0]} {{ global: *; }};\n")
            cmd.append(f"-Wl,--version-script={script}")
        subprocess.run([*cmd, "-o", os.path.join(out, "lib", lib)], check=True)
        print(lib, len(syms), "symbols", versions)


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
