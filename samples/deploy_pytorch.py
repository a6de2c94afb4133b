"""Decode from an expert bundle in a deployment script (PyTorch runtime).

    python samples/deploy_pytorch.py expert.safetensors [--max-new-tokens 64]

The base model is the one the bundle records (or pass model=... to load_runtime);
the bundle's KV cache means the prompt is not recomputed.
"""

import argparse

from griffin_export import DecodeOptions, GriffinError, load_runtime

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle")
parser.add_argument("--max-new-tokens", type=int, default=64)
args = parser.parse_args()

try:
    runtime = load_runtime(args.bundle)  # validates the bundle against the base model's fingerprint
except GriffinError as e:
    raise SystemExit(f"deploy_pytorch: {e}")
out = runtime.generate(DecodeOptions(max_new_tokens=args.max_new_tokens, stop=["###"]))
print(out.text)
