#!/usr/bin/env bash
# An accelerator session's measurements, back to back, into one file (device_check.md in $OUT, else .):
# generation in both decoding modes against HF (PyTorch on the same GPU when torch sees one) at
# batch 1 and 64 on the released architecture, then the pretrain step's MFU.
#
#   bash benchmarks/device_check.sh             # on a lent GPU/TPU: within 8 minutes on an H100
#   bash benchmarks/device_check.sh --dry-run   # the same steps with tiny shapes, on a CPU in ~1 minute
#                                               # (tests/test_device_check.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-.}
py=${PYTHON:-python}
if [ "${1:-}" = "--dry-run" ]; then
    gen=(--config tiny --new_tokens 4 --batches 1,2 --repeats 1)
    mfu=(--tiny --steps 2)
    limit=300
else
    gen=(--config full --new_tokens 32 --batches 1,64 --repeats 2)
    mfu=(--steps 10)
    limit=330
fi
{
    echo "# device check, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    $py -c "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}')"
    echo
    echo "## generation: decoding modes against HF"
    timeout "$limit" $py benchmarks/generate.py "${gen[@]}" --hf_device auto || echo "(generation: exit $?)"
    echo
    echo "## pretrain step: tokens/s and MFU"
    timeout "$limit" $py benchmarks/train_mfu.py "${mfu[@]}" || echo "(train step: exit $?)"
} 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$out_dir/device_check.md"
