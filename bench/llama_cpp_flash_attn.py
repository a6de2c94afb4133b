"""llama.cpp on the default model's full Q4_1 GGUF at a long prompt, flash attention on and off, at each
KV type (a quantized V cache needs flash attention): which one the bench's llama.cpp rows run (runtime/llama_cpp.py).

    python -m bench.llama_cpp_flash_attn --threads 2 --row 152 --repeats 15

Interleaved: each repeat decodes 32 tokens in every setting in turn, from the prompt's saved state. Run
it as `python -m`, not through the command line, whose OpenMP waits passively (docs/speed.md#threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from griffin_export.evaluation.speed import read_row, tokenize
from griffin_export.model.load import load_model
from griffin_export.targets.gguf_export import base_gguf, stderr_to

SETTINGS = [(True, "F16"), (True, "Q8_0"), (True, "F32"), (False, "F16"), (False, "F32")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--row", type=int, default=152)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--data", default="bench/data/xsum_dev.jsonl")
    a = p.parse_args()
    import llama_cpp

    lm = load_model(None)
    ids = tokenize(lm, read_row(Path(a.data), a.row))[0].tolist()
    path = base_gguf(lm.identity, None, None)
    print(f"{path.name}, row {a.row} ({len(ids)} tokens), {a.threads} threads, {a.repeats} interleaved repeats of "
          f"{a.tokens} tokens")
    contexts = {}
    for fa, kv in SETTINGS:
        t = getattr(llama_cpp, f"GGML_TYPE_{kv}")
        with stderr_to(Path("/tmp/griffin-llama-flash-attn.log")):
            llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + a.tokens + 8, n_threads=a.threads,
                                  n_threads_batch=a.threads, verbose=False, type_k=t, type_v=t, flash_attn=fa)
        llm.eval(ids)
        contexts[(fa, kv)] = (llm, llm.save_state())

    def tok_s(llm, state) -> float:
        llm.load_state(state)
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            llm.eval([7])
        return a.tokens / (time.perf_counter() - t0)

    got = {key: [] for key in contexts}
    for _ in range(a.repeats):
        for key, (llm, state) in contexts.items():
            got[key].append(tok_s(llm, state))
    for (fa, kv), v in got.items():
        print(f"flash_attn={fa!s:5} {kv:5} {statistics.median(v):6.1f} tok/s (min {min(v):.1f}, max {max(v):.1f})")


if __name__ == "__main__":
    main()
