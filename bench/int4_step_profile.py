"""Where the int4 lean graph's decode step goes (the default model, full, 2 threads): the plain step time
at a 32-token and at the 1,774-token prompt (XSum row 152), ONNX Runtime's own profile by operator (at
the short prompt; at the long one the prefill's nodes are in the sum too), and torch's read bandwidth
at buffer sizes from 32 MB to 1 GiB (docs/speed.md#kv-cache-types).

    python bench/int4_step_profile.py int8,float32 32      # KV types, block sizes
"""
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import torch

from griffin_export.model.load import load_model
from griffin_export.runtime.onnx import OnnxRuntime
from griffin_export.settings import QuantSettings
from griffin_export.targets.onnx.export import export_onnx

root = Path("/tmp/griffin-int4-profile")
lm = load_model(None)
from griffin_export.evaluation.speed import read_row, tokenize

ids_long = tokenize(lm, read_row(Path("bench/data/xsum_dev.jsonl"), 152))
ids_short = ids_long[:, :32]
print("long prompt", ids_long.shape[1], "tokens")
for kv in sys.argv[1].split(","):
    for bs in [int(b) for b in sys.argv[2].split(",")]:
        d = root / f"int4-{kv}-b{bs}"
        if not (d / "model.onnx").exists():
            export_onnx(lm, d, None, graph="lean", quantize=QuantSettings(block_size=bs), kv_dtype=kv, max_length=1900, force=True)
        class Profiled(ort.SessionOptions):
            def __init__(self):
                super().__init__(); self.enable_profiling = True; self.profile_file_prefix = str(d / "prof")
        for ids, name in ((ids_short, "32 tok"), (ids_long, f"{ids_long.shape[1]} tok")):
            rt = OnnxRuntime(d, None, threads=2, pruned_prefill=True)
            state, _ = rt.start(ids)
            for _ in range(4): rt.step(state, 7)
            times = []
            for _ in range(48):
                t0 = time.perf_counter(); rt.step(state, 7); times.append(time.perf_counter() - t0)
            plain = statistics.median(times)
            plain_o, ort.SessionOptions = ort.SessionOptions, Profiled
            try:
                rt = OnnxRuntime(d, None, threads=2, pruned_prefill=True)
            finally:
                ort.SessionOptions = plain_o
            state, _ = rt.start(ids)
            for _ in range(36): rt.step(state, 7)
            ev = json.load(open(rt._decoder.sess.end_profiling()))
            runs = [e["dur"] for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"][1:]
            by, cnt = defaultdict(float), defaultdict(int)
            for e in ev:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    op = e.get("args", {}).get("op_name", "?"); by[op] += e["dur"]; cnt[op] += 1
            n = len(runs) + 1
            print(f"== kv {kv} block {bs} prompt {name}: plain {plain*1e3:.2f} ms/step ({1/plain:.1f} tok/s); profiled run median {statistics.median(runs)/1e3:.2f} ms; node sum {sum(by.values())/n/1e3:.2f} ms")
            for op, t in sorted(by.items(), key=lambda x: -x[1])[:8]:
                print(f"   {op:32s} {t/n/1e3:7.3f} ms  {cnt[op]/n:5.0f} nodes")
from griffin_export.evaluation.speed import read_bandwidth

torch.set_num_threads(2)
for mb in (32, 64, 128, 256, 1024):
    print(f"read bandwidth, 2 threads, {mb} MB buffer: {read_bandwidth(mb << 20) / 1e9:.1f} GB/s", flush=True)
