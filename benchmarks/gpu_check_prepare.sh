#!/usr/bin/env bash
# Prepare benchmarks/gpu_check.py for a GPU machine that has PyTorch and transformers but no
# package index: Python 3.12 wheels of what it lacks go to .gpu-wheels/ (bitsandbytes keeps only
# its CPU and CUDA 13 libraries, 7 MB of its 43; 31 MB in all), and the small training set is built here into
# runs/gpu-check-data/ by notebook 01's code. Both are ignored by git; carry them to the machine and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
#   PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
#     python3 benchmarks/gpu_check.py --data runs/gpu-check-data --workdir /tmp/gpu-check --out OUT/gpu.json
# On a machine with an index, `make gpu-check` needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
dest=.gpu-wheels
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
# what the GPU image lacks (its package list is in the device tool's notes), plus transformers and
# peft at the versions this project tests with; each pinned to the version in .venv
names=(trl datasets dill multiprocess bitsandbytes xgrammar apache-tvm-ffi pydantic pydantic-core
       annotated-types typing-inspection transformers peft)
mapfile -t pkgs < <("$PY" - "${names[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PYEOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pkgs[@]}"
# bitsandbytes ships one library per CUDA/ROCm release; keep the CPU one and CUDA 13's
"$PY" - "$dest"/bitsandbytes-*.whl <<'PYEOF'
import re, shutil, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        name = item.filename.rsplit("/", 1)[-1]
        if re.fullmatch(r"libbitsandbytes_.*\.so", name) and "cpu" not in name and "cuda13" not in name:
            continue
        dst.writestr(item, src.read(item))
shutil.move(path + ".tmp", path)
PYEOF
"$PY" benchmarks/gpu_check.py --prepare-data runs/gpu-check-data
du -sh "$dest" runs/gpu-check-data
