"""Where the int4 lean graph's decode step goes (the default model, full, 2 threads): the plain step time
at a 32-token and at the 1,774-token prompt (XSum row 152), ONNX Runtime's own profile by operator (at
the short prompt; at the long one the prefill's nodes are in the sum too), and torch's read bandwidth
at buffer sizes from 32 MB to 1 GiB (docs/speed.md#kv-cache-types).

    python bench/int4_step_profile.py int8,float32 32      # KV types, block sizes
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from ort_decode_profile import decoder_profile, profiled

from griffin_export.evaluation.speed import read_bandwidth, read_row, tokenize
from griffin_export.model.load import load_model
from griffin_export.runtime.onnx import OnnxRuntime
from griffin_export.settings import QuantSettings
from griffin_export.targets.onnx.export import export_onnx

ROOT = Path("/tmp/griffin-int4-profile")
STEPS, PROFILED_STEPS, WARMUP = 48, 36, 4


def step_seconds(rt: OnnxRuntime, ids: torch.Tensor) -> float:
    """The median plain decode step after the prompt (its prefill through the same graph)."""
    state, _ = rt.start(ids)
    for _ in range(WARMUP):
        rt.step(state, 7)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        rt.step(state, 7)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    kv_dtypes, blocks = sys.argv[1].split(","), [int(b) for b in sys.argv[2].split(",")]
    lm = load_model(None)
    ids_long = tokenize(lm, read_row(Path("bench/data/xsum_dev.jsonl"), 152))
    ids_short = ids_long[:, :32]
    print("long prompt", ids_long.shape[1], "tokens")
    for kv in kv_dtypes:
        for bs in blocks:
            d = ROOT / f"int4-{kv}-b{bs}"
            ROOT.mkdir(parents=True, exist_ok=True)
            if not (d / "model.onnx").exists():
                export_onnx(lm, d, None, graph="lean", quantize=QuantSettings(block_size=bs), kv_dtype=kv,
                            max_length=1900, force=True)
            for ids, name in ((ids_short, "32 tok"), (ids_long, f"{ids_long.shape[1]} tok")):
                plain = step_seconds(OnnxRuntime(d, None, threads=2, pruned_prefill=True), ids)
                rt = profiled(lambda: OnnxRuntime(d, None, threads=2, pruned_prefill=True), d / "prof")
                state, _ = rt.start(ids)
                for _ in range(PROFILED_STEPS):
                    rt.step(state, 7)
                runs, by, cnt = decoder_profile(rt)
                runs = runs[1:]  # the first run is the prompt's prefill
                n = len(runs) + 1
                print(f"== kv {kv} block {bs} prompt {name}: plain {plain * 1e3:.2f} ms/step ({1 / plain:.1f} tok/s); "
                      f"profiled run median {statistics.median(runs) / 1e3:.2f} ms; node sum {sum(by.values()) / n / 1e3:.2f} ms")
                for op, t in sorted(by.items(), key=lambda x: -x[1])[:8]:
                    print(f"   {op:32s} {t / n / 1e3:7.3f} ms  {cnt[op] / n:5.0f} nodes")
    torch.set_num_threads(2)
    for mb in (32, 64, 128, 256, 1024):
        print(f"read bandwidth, 2 threads, {mb} MB buffer: {read_bandwidth(mb << 20) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
