"""onnxruntime-genai as a benchmark row: its own generation loop on our lean graphs (which it
loads as they are: the lean export writes genai_config.json beside the graph), and on the full
model as its own builder writes it, so the table compares our graph with the one its users get."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..bundle.format import Bundle
from ..errors import GriffinError
from ..model.load import LoadedModel, dtype_name
from ..settings import KV_DTYPES
from ..targets.onnx.graph import step_read_bytes
from .onnx import bench_graph, graph_bytes
from .timing import BenchContext, BenchRow


def decode_seconds(model, ids: list[int], n: int) -> float:
    """n decode steps of onnxruntime-genai's own loop (greedy), after its prefill of the prompt."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n + 2, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    gen.generate_next_token()  # the prompt's forward, wherever og runs it: not timed
    t0 = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()
    return time.perf_counter() - t0


def open_model(directory: Path, threads: int | None):
    import onnxruntime_genai as og

    if threads:  # og reads session options from genai_config.json
        cfg_path = directory / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return og.Model(str(directory))


def builder_graph(lm: LoadedModel, directory: Path, provider: str) -> Path:
    """The full model written by onnxruntime-genai's own builder, from the same weights (saved as
    an HF directory first: the builder loads with from_pretrained)."""
    hf = directory / "hf"
    lm.model.save_pretrained(hf)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(hf)
    precision = {torch.float32: "fp32", torch.float16: "fp16"}.get(lm.dtype)
    if precision is None:
        raise GriffinError(f"the genai rows take float32 or float16 models, not {lm.dtype}")
    out = directory / "genai-builder"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", "cuda" if provider == "cuda" else "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise GriffinError(f"onnxruntime-genai's builder failed on this model: {tail[0]}")
    return out


def bench_rows(ctx: BenchContext, variant: str, bundle: Bundle | None, kv_dtype: str | None = None
               ) -> dict[str, BenchRow]:
    """The full model: its builder's graph ("full", its KV in the weights' dtype, so only at that KV
    type) and our lean graph ("lean full"); a bundle: our lean graph, measured against our lean full
    graph, so its ratio is the pruning's alone. Our lean graphs' KV buffers are of kv_dtype (None:
    the weights' dtype): og allocates its cache from the graph's input types, so it runs them as
    they are."""
    import onnxruntime_genai

    s = ctx.settings
    prompt = ctx.ids[0].tolist()
    info = {"onnxruntime_genai": onnxruntime_genai.__version__}
    own = dtype_name(ctx.lm.dtype)
    kv = kv_dtype or own

    def row(directory: Path, kv: str, vs: str) -> BenchRow:
        model = open_model(directory, s.threads)
        return BenchRow(lambda n: decode_seconds(model, prompt, n), graph_bytes(directory), vs=vs, info=info,
                        weight_bytes=step_read_bytes(directory), kv=kv)

    ours = bench_graph(ctx, bundle, "lean", False, kv)
    if bundle is not None:
        return {"": row(ours, kv, "lean full")}
    if kv != own:  # the builder's graph has no such KV: our lean full graph is this KV type's reference
        return {"lean full": row(ours, kv, "lean full")}
    return {"": row(builder_graph(ctx.lm, ctx.tmp, s.onnx_provider), own, "full"), "lean full": row(ours, kv, "full")}


BENCH_KV_DTYPES = {"genai": KV_DTYPES}  # runtime/timing.py
