#!/bin/bash
# The aarch64 (NEON) build of parq_kernels._C, cross-compiled on an x86-64 Debian 12 host and
# tested under qemu-user (README: "ARM"). Manual, not in CI: it downloads ~0.5 GB (the
# aarch64 torch wheel, Debian's arm64 CPython) and takes ~15 minutes on 2 cores. Emulation
# says whether the NEON code builds, loads and gives the reference's values, not how fast.
#
#   tools/arm_qemu/check.sh [WORKDIR] [test files...]   (root: apt-get, dpkg)
#
# Needs: apt (Debian bookworm), qemu-user (qemu-aarch64 7.2), a host python with pip.
# The aarch64 torch wheel is a CUDA 13 build: its CUDA libraries are replaced by stand-ins
# whose functions all fail ("no device": cuda_stubs.py), so torch runs CPU-only. qemu 7.2
# shows the guest the host's /proc/cpuinfo, on which torch's CPU detection crashes: the
# sysroot gets an ARM one (Neoverse-N1), which qemu -L serves in its place.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${1:-/tmp/parq-arm}
shift || true
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_cpu_level_search.py tests/test_cpu_step_loop.py tests/test_cpu_levels.py
         tests/test_fused_step_backends.py tests/test_cpu_backend.py)
fi
PIP=${PIP:-"$REPO/.venv/bin/python -m pip"}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
mkdir -p "$W" && cd "$W"
rm -rf src && git clone -q "$REPO" src  # the committed HEAD

# 1. Debian's arm64 CPython 3.11, unpacked into a sysroot (nothing arm64 is installed)
if [ ! -x root/usr/bin/python3.11 ]; then
  dpkg --add-architecture arm64 && apt-get update -qq
  mkdir -p debs root && (cd debs && apt-get download $(for p in python3.11-minimal \
    libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libc6 libexpat1 zlib1g libffi8 \
    libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libstdc++6 libgcc-s1 libgomp1 libuuid1 libncursesw6 \
    libtinfo6 libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1 libgssapi-krb5-2 \
    libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libzstd1; do echo "$p:arm64"; done))
  for d in debs/*.deb; do dpkg -x "$d" root; done
fi
command -v aarch64-linux-gnu-g++ > /dev/null || apt-get install -y -qq g++-aarch64-linux-gnu
command -v qemu-aarch64 > /dev/null || apt-get install -y -qq qemu-user
for i in 0 1; do  # an ARM CPU for torch's detection (Neoverse-N1: NEON, no SVE)
  d=root/sys/devices/system/cpu/cpu$i/regs/identification
  mkdir -p "$d" && echo 0x00000000413fd0c1 > "$d/midr_el1"
done
mkdir -p root/proc && for i in 0 1; do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' $i
done > root/proc/cpuinfo

# 2. aarch64 site-packages: torch unpacked from its wheel (its CUDA wheels are not fetched)
if [ ! -d site/torch ]; then
  mkdir -p wheels site
  $PIP download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 -d wheels "torch==$TORCH_VERSION"
  (cd site && unzip -q -o ../wheels/torch-"$TORCH_VERSION"-*aarch64.whl)
  P=""; for t in 2_28 2_27 2_26 2_24 2_17; do P="$P --platform manylinux_${t}_aarch64"; done
  $PIP install -q --target site $P --platform manylinux2014_aarch64 --python-version 3.11 \
    --only-binary=:all: filelock typing-extensions sympy mpmath networkx jinja2 markupsafe fsspec \
    numpy pytest iniconfig pluggy packaging "safetensors==0.8.0" setuptools
fi
if [ ! -d cudastub/lib ]; then  # the CUDA symbols torch's libraries need and nothing defines
  mkdir -p cudastub/lib && T=site/torch
  for f in $T/lib/*.so* $T/_C*.so; do aarch64-linux-gnu-nm -D --undefined-only "$f" | awk '$1=="U"{print $2}'; done | sort -u > cudastub/undefv.txt
  sed 's/@.*//' cudastub/undefv.txt | sort -u > cudastub/undef.txt
  for f in $T/lib/*.so* $T/_C*.so root/lib/aarch64-linux-gnu/*.so* root/usr/lib/aarch64-linux-gnu/*.so* root/usr/bin/python3.11; do
    [ -f "$f" ] && aarch64-linux-gnu-nm -D --defined-only "$f" 2>/dev/null | awk '{print $NF}'
  done | sed 's/@.*//' | sort -u > cudastub/defined.txt
  comm -23 cudastub/undef.txt cudastub/defined.txt > cudastub/missing.txt
  awk -F@ 'NR==FNR{m[$1]=1;next} ($1 in m){print}' cudastub/missing.txt cudastub/undefv.txt > cudastub/missingv.txt
  python3 "$REPO/tools/arm_qemu/cuda_stubs.py" cudastub
fi
cat > py <<EOP
#!/bin/sh
# aarch64 CPython under qemu-user (sys.executable: child interpreters run under qemu too)
exec qemu-aarch64 -cpu neoverse-n1 -L $W/root -0 $W/py -E LD_LIBRARY_PATH=$W/cudastub/lib $W/root/usr/bin/python3.11 "\$@"
EOP
chmod +x py

# 3. the extension, as setup.py builds it off x86-64: csrc/*.cpp with the baseline flags,
# csrc/cpu/*.cpp once, at the default level (NEON through ATen's Vectorized)
T=$W/site/torch
FLAGS=(-Wsign-compare -DNDEBUG -fwrapv -O3 -Wall -fPIC -std=c++20 -fopenmp -ffp-contract=off
  -fno-trapping-math -fno-math-errno -Wno-unknown-pragmas -DTORCH_API_INCLUDE_EXTENSION_H
  -DTORCH_EXTENSION_NAME=_C -I"$T/include" -I"$T/include/torch/csrc/api/include"
  -I"$W/root/usr/include/python3.11" -I"$W/root/usr/include")
mkdir -p obj && rm -f obj/*.o
for s in src/csrc/*.cpp; do echo "${FLAGS[*]} -c $s -o obj/base_$(basename "$s" .cpp).o"; done > obj/cmds
for s in src/csrc/cpu/*.cpp; do
  echo "${FLAGS[*]} -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT -c $s -o obj/level_$(basename "$s" .cpp).o"
done >> obj/cmds
xargs -P "$(nproc)" -d '\n' -I{} sh -c 'aarch64-linux-gnu-g++ {}' < obj/cmds
aarch64-linux-gnu-g++ -shared -fPIC obj/base_*.o obj/level_*.o -L"$T/lib" -lc10 -ltorch \
  -ltorch_cpu -ltorch_python -fopenmp -Wl,-rpath-link,"$T/lib" -Wl,-rpath-link,"$W/cudastub/lib" \
  -Wl,-rpath-link,"$W/root/lib/aarch64-linux-gnu" -o src/parq_kernels/_C.cpython-311-aarch64-linux-gnu.so

# 4. the tests, under emulation (~35 s of start-up each)
cd src && export PYTHONPATH="$W/site:$W/src"
"$W/py" -c "import torch; from parq_kernels import backends; print(torch.__version__, torch.backends.cpu.get_cpu_capability(), backends.availability('cpu'), backends.cpu_levels())"
for t in "${TESTS[@]}"; do
  echo "== $t" && "$W/py" -m pytest -q -p no:cacheprovider "$t" -k "not triton and not cuda" | tail -2
done
