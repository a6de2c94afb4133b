"""Where an ONNX Runtime decode step's time goes: wall time per step, and ORT's own profile
(nodes run per step and their host-side time by operator).

    python bench/ort_decode_profile.py                  # Llama-2-7B shape, fp16, CUDA provider
    python bench/ort_decode_profile.py --tiny           # small shape, fp32, CPU provider (smoke run)

On a GPU at batch 1, a step that launches ~1,800 small kernels is bound by the host issuing
them, not by reading the weights; this script is how that was measured (README, Speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from llama7b_shape import LLAMA2_7B, TINY, random_model

from griffin_export.targets.onnx.export import export_onnx
from griffin_export.runtime.onnx import OnnxRuntime


def steps_per_second(rt: OnnxRuntime, ids: torch.Tensor, n: int) -> float:
    state, _ = rt.start(ids)
    for _ in range(5):  # warm-up
        rt.step(state, 7)
    t0 = time.perf_counter()
    for _ in range(n):
        rt.step(state, 7)
    return (time.perf_counter() - t0) / n


def profiled(make: Callable[[], OnnxRuntime], prefix: Path) -> OnnxRuntime:
    """make() with ONNX Runtime's profiler on in every session it opens (the runtime builds its sessions
    from ort.SessionOptions()), writing to files named `prefix`*."""
    import onnxruntime as ort

    class Profiled(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(prefix)

    plain_options, ort.SessionOptions = ort.SessionOptions, Profiled
    try:
        return make()
    finally:
        ort.SessionOptions = plain_options


def decoder_profile(rt: OnnxRuntime) -> tuple[list[float], dict[str, float], dict[str, int]]:
    """The decode session's profile so far: each run's duration, and the nodes' time and count by operator
    (microseconds, summed over the runs)."""
    events = json.load(open(rt._decoder.sess.end_profiling()))
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    by_op, count = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            count[op] += 1
    return runs, by_op, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--graph", default="/tmp/griffin-ort-profile", help="where the full graph is exported")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()

    provider = "cpu" if a.tiny else "cuda"
    lm = random_model(TINY if a.tiny else LLAMA2_7B, None, torch.float32 if a.tiny else torch.float16,
                      "cpu" if a.tiny else "cuda", 0)
    export_onnx(lm, a.graph, force=True)
    ids = torch.randint(0, lm.config.vocab_size, (1, a.prompt_tokens), generator=torch.Generator().manual_seed(0))
    plain = steps_per_second(OnnxRuntime(a.graph, None, full=a.graph, provider=provider), ids, 2 * a.steps)
    print(f"{lm.identity}, {provider} provider: {plain * 1e3:.2f} ms per decode step (no profiling)")

    rt = profiled(lambda: OnnxRuntime(a.graph, None, full=a.graph, provider=provider), Path(a.graph) / "ortprofile")
    steps_per_second(rt, ids, a.steps)
    runs, by_op, count = decoder_profile(rt)
    n = len(runs)  # the decode session's runs: warm-up and timed steps (prefill ran in the full session)
    print(f"profiled: {n} runs, median {statistics.median(runs) / 1e3:.2f} ms per run; "
          f"{sum(count.values()) / n:.0f} nodes per run; host-side node time {sum(by_op.values()) / n / 1e3:.2f} ms per run")
    for op, d in sorted(by_op.items(), key=lambda x: -x[1])[:12]:
        print(f"  {op:16s} {d / n / 1e3:7.3f} ms/run {count[op] / n:6.0f} nodes/run")


if __name__ == "__main__":
    main()
