#!/usr/bin/env bash
# Prepare benchmarks/gpu_check.py for a GPU machine that has PyTorch and transformers but no
# package index: Python 3.12 wheels of what it lacks go to .gpu-wheels/ (bitsandbytes keeps only
# its CPU and CUDA 13 libraries, 8 MB of its 43), and the small training set is built here into
# runs/gpu-check-data/ by notebook 01's code. Both are ignored by git; carry them to the machine and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --data runs/gpu-check-data
# On a machine with an index, `make gpu-check` needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
dest=.gpu-wheels
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
# what the GPU image lacks (its package list is in the device tool's notes); versions as in .venv
pkgs=(trl datasets "dill<0.4.2" "multiprocess<0.70.20" bitsandbytes xgrammar apache-tvm-ffi pydantic
      pydantic-core annotated-types typing-inspection)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pkgs[@]}"
# bitsandbytes ships one library per CUDA/ROCm release; keep the CPU one and CUDA 13's
bnb=$(ls "$dest"/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && "$OLDPWD/$PY" -m zipfile -e "$OLDPWD/$bnb" . \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cpu*' ! -name '*cuda13*' -delete \
  && rm "$OLDPWD/$bnb" && "$OLDPWD/$PY" -m zipfile -c "$OLDPWD/$bnb" ./*)
rm -rf "$tmp"
"$PY" benchmarks/gpu_check.py --prepare-data runs/gpu-check-data
du -sh "$dest" runs/gpu-check-data
