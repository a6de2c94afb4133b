"""Three small measurements behind the README's reading of the lean paths' speed (default model,
999-token prompt, density 0.5 where a bundle is needed):

  1. a one-token matmul with the 113 MB lm_head: x @ W ([in, out], what runtime/lean.py stores)
     against F.linear's x @ W.T;
  2. the lean PyTorch step eager against torch.compile'd (the CPU default is whichever is faster);
  3. one ONNX Runtime decode step of the lean pruned graph through OnnxRuntime.step against a bare
     run_with_iobinding of the same graph (what our loop costs).

    python bench/lean_step_probe.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from griffin_export.evaluation.speed import find_data, read_row
from griffin_export.method.export import export_ids
from griffin_export.model.load import load_model
from griffin_export.model.prefill import cache_tensors, prefill
from griffin_export.model.tokens import tokenize
from griffin_export.runtime.timing import median_seconds
from griffin_export.settings import ExportSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(2)
    lm = load_model(quiet=True)
    ids = tokenize(lm, read_row(find_data(None), 0))
    T = ids.shape[1]
    cache, last = prefill(lm.model, ids)
    kv, first = cache_tensors(cache), int(last.argmax())

    w = lm.model.get_output_embeddings().weight.detach()
    x, wt = torch.randn(1, w.shape[1]), w.t().contiguous()
    lin = median_seconds(lambda: [F.linear(x, w) for _ in range(20)], a.repeats) / 20
    mm = median_seconds(lambda: [x @ wt for _ in range(20)], a.repeats) / 20
    print(f"lm_head {list(w.shape)}: F.linear {lin * 1e3:.2f} ms, x @ W[in,out] {mm * 1e3:.2f} ms")

    from griffin_export.runtime.lean import LeanDecoder

    def steps(dec):
        def run():
            dec.load_cache(kv, T)
            tok = first
            for _ in range(64):
                tok = int(dec.step(tok).argmax())
        return run

    eager = LeanDecoder(copy.deepcopy(lm.model), T + 80)
    compiled = LeanDecoder(copy.deepcopy(lm.model), T + 80, compile=True, static_length=T + 80)
    t0 = time.perf_counter()
    steps(compiled)()
    compile_s = time.perf_counter() - t0
    e, c = median_seconds(steps(eager), a.repeats), median_seconds(steps(compiled), a.repeats)
    print(f"lean step, full model, 64 tokens: eager {64 / e:.1f} tok/s, compiled {64 / c:.1f} tok/s "
          f"(first compiled run {compile_s:.0f} s)")

    from griffin_export.runtime.onnx import OnnxRuntime
    from griffin_export.targets.onnx.export import export_onnx

    bundle = export_ids(lm, ids, ExportSettings(density=0.5, warmup=0))
    with tempfile.TemporaryDirectory() as tmp:
        rt = OnnxRuntime(export_onnx(lm, Path(tmp) / "g", bundle), None, provider="cpu", threads=2)
        sess = rt._decoder

        def via_step():
            st, tok = rt.state_from_kv(kv, T), first
            for _ in range(64):
                tok = int(rt.step(st, tok).argmax())

        def bare():
            st, tok = rt.state_from_kv(kv, T), first
            io = sess._binding(st)
            for i in range(64):
                io.bind_cpu_input("input_ids", np.array([[tok]], np.int64))
                io.bind_cpu_input("attention_mask", sess._mask[:, :T + i + 1])
                io.bind_output("logits", "cpu")
                sess.sess.run_with_iobinding(io)
                tok = int(io.get_outputs()[0].numpy()[0, -1].argmax())

        s_step, s_bare = median_seconds(via_step, a.repeats), median_seconds(bare, a.repeats)
        print(f"ORT lean pruned graph, per step: OnnxRuntime.step {s_step / 64 * 1e3:.2f} ms, "
              f"bare run_with_iobinding {s_bare / 64 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
