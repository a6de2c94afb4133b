"""Decode from an expert bundle with ONNX Runtime (no PyTorch model is loaded).

    griffin-export onnx expert.safetensors -o expert_onnx/        # once per base model and k
    python samples/deploy_onnx.py expert_onnx/ expert.safetensors [--max-new-tokens 64]

Any bundle of the same base model and k per layer runs on the same graph: its FF weights
replace the graph's at session creation. CUDA is used when a GPU answers, else the CPU.
"""

import argparse
import sys

from griffin_export import DecodeOptions, GriffinError
from griffin_export.runtime.onnx import load_onnx_runtime

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("graph")
parser.add_argument("bundle")
parser.add_argument("--max-new-tokens", type=int, default=64)
args = parser.parse_args()

try:
    runtime = load_onnx_runtime(args.graph, args.bundle)  # checks fingerprint, k per layer, dtype
except GriffinError as e:
    raise SystemExit(f"deploy_onnx: {e}")
print(runtime.describe(), file=sys.stderr)  # which provider runs
print(runtime.generate(DecodeOptions(max_new_tokens=args.max_new_tokens, stop=["###"])).text)
