"""Scratch: int4 accuracy levels on the default model: decode tok/s + greedy agreement vs fp32 pruned."""
import time, tempfile
from pathlib import Path
import torch
from griffin_export.models import load_model
from griffin_export.bench import read_row, find_data, _onnx_decode_seconds
from griffin_export.export import ExportSettings, export_ids, tokenize
from griffin_export.onnx_export import export_onnx
from griffin_export.onnx_quant import QuantSettings
from griffin_export.runtime.onnx import OnnxRuntime
from griffin_export.prefill import prefill, cache_tensors
torch.set_num_threads(2)
lm = load_model(None, quiet=True)
ids = tokenize(lm, read_row(find_data(None), 0))
print("tokens", ids.shape)
b = export_ids(lm, ids, ExportSettings(density=0.5, warmup=0))
cache, last = prefill(lm.model, ids); kv = cache_tensors(cache); T = ids.shape[1]; first = int(last.argmax())
tmp = Path(tempfile.mkdtemp())
cfgs = {"fp32": None, "int4 L0": QuantSettings(accuracy_level=0), "int4 L4": QuantSettings(accuracy_level=4),
        "int4 L4 float head": QuantSettings(accuracy_level=4, lm_head=False)}
rts = {}
for name, q in cfgs.items():
    t0 = time.time()
    d = export_onnx(lm, tmp / name.replace(" ", "_"), b, quantize=q)
    rts[name] = OnnxRuntime(d, None, provider="cpu", threads=2)
    print(name, "export", round(time.time() - t0, 1), "s", sum(f.stat().st_size for f in d.iterdir()) / 1e6, "MB")
def greedy(rt, n=64):
    st = rt.state_from_kv(kv, T); tok = first; out = []
    for _ in range(n):
        tok = int(rt.step(st, tok).argmax()); out.append(tok)
    return out
ref = greedy(rts["fp32"])
for name, rt in rts.items():
    g = greedy(rt)
    agree = next((i for i, (a, c) in enumerate(zip(ref, g)) if a != c), len(ref))
    print(name, "first disagreement at", agree, "same", sum(a == c for a, c in zip(ref, g)))
times = {n: [] for n in rts}
for r in range(5):
    for n, rt in rts.items():
        times[n].append(_onnx_decode_seconds(rt, kv, T, first, 64))
import statistics
base = statistics.median(times["fp32"])
for n in rts:
    m = statistics.median(times[n]); print(f"{n}: {64/m:.1f} tok/s, {base/m:.2f}x fp32")
