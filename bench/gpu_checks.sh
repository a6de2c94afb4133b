#!/usr/bin/env bash
# Every GPU check of the fast-decode work in one run on a lent GPU machine (run from the repo
# root; writes under $OUT). About 8-10 minutes on an H200, most of it the 7B-shaped exports.
#   bash bench/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi || true
  python3 -m pip install -q -e ".[test]" 2>&1 | tail -2
  python3 -m pip install -q --no-deps onnxruntime-genai-cuda 2>&1 | tail -2
  python3 -c "import torch, onnxruntime as o; print(torch.__version__, torch.cuda.get_device_name(0), o.__version__)"
} > "$OUT/env.txt" 2>&1
# the machine's copy bandwidth: the ≤ 2× weight-read target is against it
python3 - > "$OUT/bandwidth.txt" 2>&1 <<'PY'
import torch, time
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"device-to-device copy: {2 * x.numel() / dt / 1e12:.2f} TB/s (read + write)")
PY
# the CUDA tests (they skip on machines without a GPU)
python3 -m pytest -q -rs tests/test_lean.py tests/test_onnx.py -k "cuda or CUDA" > "$OUT/pytest_cuda.txt" 2>&1
# Llama-2-7B shape, fp16: today's paths beside the lean ones (compiled PyTorch step, ORT CUDA graphs)
timeout 420 python3 bench/llama7b_shape.py --density 0.5 --runtime torch,torch-lean,onnx-lean --onnx-provider cuda \
  --repeats 5 -o "$OUT/llama7b" > "$OUT/llama7b.txt" 2>&1
tail -n 20 "$OUT/llama7b.txt"
