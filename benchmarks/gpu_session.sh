#!/usr/bin/env bash
# One short GPU session for issue 19 (training throughput): at most about 9 minutes on one GPU.
# Run from the repository root on the GPU machine; writes everything under $OUT (default ./gpu_out):
#   env.txt                  torch, CUDA and the card
#   throughput_b256.md       benchmarks/train_throughput.py at batch 256: before / after / compiled
#   test_cuda.txt            the CUDA tests (tests/test_cuda.py: the fast path against eager, ...)
#   throughput_b128.md       the same at batch 128, before / after only
#   replicas.md              4 seeds of 2L/64 and 6L/192 at batch 256 as one replica group against 4 separate runs
# Each part has its own time limit, most important first, so a slow part cannot eat the rest.
set -u
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi -L || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

timeout 270 "$PY" benchmarks/train_throughput.py --device cuda --fast --batches 256 --models 6L192 4L128 2L64 \
  > "$OUT/throughput_b256.md" 2> "$OUT/throughput_b256.err"
echo "throughput_b256: exit $?" >> "$OUT/env.txt"

if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest tests/test_cuda.py -m gpu -q -p no:randomly -p no:cacheprovider > "$OUT/test_cuda.txt" 2>&1
  echo "test_cuda: exit $?" >> "$OUT/env.txt"
else
  echo "test_cuda: skipped (no pytest on this machine)" >> "$OUT/env.txt"
fi

timeout 60 "$PY" benchmarks/train_throughput.py --device cuda --no-fast --batches 128 --repeats 3 --models 6L192 4L128 2L64 \
  > "$OUT/throughput_b128.md" 2> "$OUT/throughput_b128.err"
echo "throughput_b128: exit $?" >> "$OUT/env.txt"
timeout 60 "$PY" benchmarks/train_throughput.py --device cuda --replicas 4 --batches 256 --models 2L64 6L192 \
  --steps 30 --repeats 3 --warmup 5 > "$OUT/replicas.md" 2> "$OUT/replicas.err"
echo "replicas: exit $?" >> "$OUT/env.txt"
cat "$OUT/env.txt" "$OUT/throughput_b256.md" "$OUT/throughput_b128.md" "$OUT/replicas.md"
tail -n 3 "$OUT/test_cuda.txt" 2>/dev/null || true
