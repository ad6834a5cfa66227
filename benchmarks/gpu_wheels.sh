#!/usr/bin/env bash
# The wheels a GPU call carries (at most 64 MiB): the team's fetch script with bitsandbytes, whose wheel is then cut
# to the libraries of the GPU machine's CUDA 13 (130/132) and the CPU, so that LoRA and QLoRA fit in one call
# (sizes in docs/benchmarks.md).   Usage: bash benchmarks/gpu_wheels.sh [DEST=.whl]   (DEST is git-ignored)
set -euo pipefail
dest=${1:-.whl}
here=$(cd "$(dirname "$0")" && pwd)
[ -n "$(ls "$dest"/xtuner-*.whl 2>/dev/null)" ] || bash "$here/../../shared/gpu/fetch-wheels.sh" "$dest" --qlora
# the fused losses of speed.fused_loss (pure Python over triton, which the GPU image has)
[ -n "$(ls "$dest"/liger_kernel-*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp -d "$dest" cut-cross-entropy==25.1.1 liger-kernel==0.8.5 2>&1 | grep -v WARNING || true
python3 - "$dest" <<'PY'
import re, sys, zipfile
from pathlib import Path

for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    drop = re.compile(r"bitsandbytes/libbitsandbytes_(rocm\d+|cuda1[0-2]\d)\.so$")
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not drop.search(n)]
        if len(names) == len(src.namelist()):
            continue  # already cut
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for name in names:
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):  # the removed files leave the record too
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not drop.search(l.split(",")[0])) + "\n").encode()
                out.writestr(src.getinfo(name), data)
    tmp.replace(wheel)
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB after cutting to CUDA 13 and the CPU")
PY
du -sh "$dest"
