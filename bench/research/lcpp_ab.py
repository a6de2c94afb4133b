"""Scratch A/B (research): llama.cpp decode tok/s of GGUF files, interleaved, 999-token XSum row 0, 2 threads.

    python bench/research/lcpp_ab.py BASE.gguf PRUNED.gguf   # prints median tok/s, ratio to the first, per-repeat tok/s
"""
import sys, time, statistics
import numpy as np
from llama_cpp import Llama
from griffin_export.models import load_model
from griffin_export.bench import read_row, find_data
from griffin_export.export import tokenize
lm = load_model(None, quiet=True)
ids = tokenize(lm, read_row(find_data(None), 0))[0].tolist()
paths = sys.argv[1:]
runs = {}
for p in paths:
    llm = Llama(p, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
    llm.eval(ids); runs[p] = (llm, llm.save_state())
def run(p, n=64):
    llm, state = runs[p]; llm.load_state(state)
    nv = llm.n_vocab(); lg = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))
    tok = int(np.argmax(lg())); t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok]); tok = int(np.argmax(lg()))
    return time.perf_counter() - t0
for p in paths: run(p, 8)
ts = {p: [] for p in paths}
for r in range(7):
    for p in paths: ts[p].append(run(p))
b = statistics.median(ts[paths[0]])
for p in paths:
    m = statistics.median(ts[p]); print(p, f"{64/m:.1f} tok/s {b/m:.2f}x", [round(64/t) for t in ts[p]])
