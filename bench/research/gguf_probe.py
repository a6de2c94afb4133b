"""Scratch (research): a pruned Q4_1 GGUF of XSum row 0 (density 0.5, warm-up 0) and a quick llama.cpp decode.

    python bench/research/gguf_probe.py [METHOD] [OUT.gguf]
"""
import sys, time
import numpy as np, torch
from griffin_export.models import load_model
from griffin_export.bench import read_row, find_data
from griffin_export.export import ExportSettings, export_ids, tokenize
from griffin_export.gguf_export import write_pruned_gguf, base_gguf
torch.set_num_threads(2)
lm = load_model(None, quiet=True)
ids = tokenize(lm, read_row(find_data(None), 0))
method = sys.argv[1] if len(sys.argv) > 1 else "topk"
b = export_ids(lm, ids, ExportSettings(density=0.5, warmup=0, method=method))
base = base_gguf(None, None, b.info)
t0 = time.time()
out = write_pruned_gguf(b, base, sys.argv[2] if len(sys.argv) > 2 else f"pruned_{method}.gguf", "Q4_1", force=True, threads=2)
print("wrote", out, out.stat().st_size / 1e6, "MB", round(time.time() - t0, 1), "s")
from llama_cpp import Llama
for path in (base, out):
    llm = Llama(str(path), n_ctx=2048, n_threads=2, verbose=False, logits_all=False)
    toks = ids[0].tolist()
    llm.eval(toks)
    state = llm.save_state()
    def run(n=64):
        llm.load_state(state)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))); out = [tok]
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok]); tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))); out.append(tok)
        return time.perf_counter() - t0, out
    run(8)
    ts = [run()[0] for _ in range(3)]
    print(path.name, "decode tok/s", [round(64 / t, 1) for t in ts], lm.tokenizer.decode(run()[1][:30]))
