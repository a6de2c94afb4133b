"""Speed benchmark: full model vs bundles, side by side in one process, per runtime.

Every ratio is measured within one run: configurations (of every runtime) are interleaved
repeat by repeat so drift on a noisy machine hits them alike, and medians are reported.
Each "vs full" ratio compares a runtime's pruned decode with the same runtime's full model.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bundle.format import write_bundle
from ..choices import RUNTIMES, config_name, parse_config
from ..errors import GriffinError
from ..method.budget import k_text
from ..method.export import export_ids
from ..model.load import LoadedModel, load_model
from ..model.prefill import cache_tensors, forward, prefill, restore_cache
from ..model.tokens import check_context, tokenize
from ..runtime.pytorch import TorchRuntime
from ..settings import BenchSettings, ExportSettings, QuantSettings
from .provenance import machine

DEFAULT_DATA = Path("shared") / "data" / "xsum_dev.jsonl"
# ONNX runtime rows: (runtime, graph, quantized)
_ONNX_ROWS = (("onnx", "traced", False), ("onnx-lean", "lean", False), ("onnx-int4", "traced", True),
              ("onnx-lean-int4", "lean", True))


def find_data(data: str | None) -> Path:
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise GriffinError(f"data file {data} does not exist")
        return path
    here = Path.cwd()
    for base in (here, *here.parents):
        if (base / DEFAULT_DATA).is_file():
            return base / DEFAULT_DATA
    raise GriffinError(f"no --data given and no {DEFAULT_DATA} found above {here}; pass --data FILE.jsonl")


def read_row(path: Path, row: int, field_name: str = "article") -> str:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == row:
                try:
                    return json.loads(line)[field_name]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GriffinError(f"{path}:{i + 1}: not a JSON object with a {field_name!r} field") from None
    raise GriffinError(f"{path} has no row {row}")


def read_elements(model: torch.nn.Module) -> int:
    """Weight elements read per decoded token: every weight once, except the input
    embedding, of which one row is read (unless it is tied to the output head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel()
    return total


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _greedy_seconds(step, first: int, n: int, device: torch.device | None = None) -> float:
    """Seconds of n greedy steps (step: token -> logits [vocab]), the GPU's queue drained at the end."""
    tok = first
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(step(tok).argmax())
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _decode_seconds(model, kv, prompt_len: int, first: int, n: int) -> float:
    """Time n greedy decode steps from a fresh copy of the prompt's KV."""
    cache = restore_cache(model, [(k.clone(), v.clone()) for k, v in kv], prompt_len)
    device = next(model.parameters()).device
    return _greedy_seconds(lambda t: forward(model, torch.tensor([[t]], device=device), cache)[-1], first, n, device)


def _onnx_decode_seconds(rt, kv, prompt_len: int, first: int, n: int) -> float:
    """The same n greedy steps with ONNX Runtime, from a fresh copy of the prompt's KV."""
    state = rt.state_from_kv(kv, prompt_len)
    return _greedy_seconds(lambda t: rt.step(state, t), first, n)


def _ff_elements(lm: LoadedModel) -> int:
    """Elements of the full model's FF weights and biases."""
    from ..model.arch import ff_blocks

    total = 0
    for b in ff_blocks(lm.model, lm.spec):
        for lin in (*b.inputs.values(), b.output):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total


def _lean_decode_seconds(lean, kv, prompt_len: int, first: int, n: int) -> float:
    """The same n greedy steps through the lean PyTorch step, from the prompt's KV."""
    lean.load_cache(kv, prompt_len)
    return _greedy_seconds(lean.step, first, n, lean.device)


def _genai_decode_seconds(model, ids: list[int], n: int) -> float:
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


def _graph_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith("model.onnx"))


def _onnx_config(lm: LoadedModel, directory: Path, bundle, threads: int | None, provider: str, graph: str,
                 quantize: QuantSettings | None = None):
    """Export a graph (the full model's when bundle is None) and open it with ONNX Runtime."""
    from ..runtime.onnx import OnnxRuntime
    from ..targets.onnx.export import export_onnx

    export_onnx(lm, directory, bundle, graph=graph, quantize=quantize)
    # on a GPU the lean graph's decode step is a captured CUDA graph (its buffers are fixed);
    # the full model's graph prefills through its own session (pruned_prefill: no second session)
    cuda_graph = graph == "lean" and provider == "cuda"
    rt = OnnxRuntime(directory, None, provider=provider, threads=threads, cuda_graph=cuda_graph,
                     pruned_prefill=bundle is None)
    return rt, _graph_bytes(directory)


class _LlamaCpp:
    """A GGUF in llama.cpp (llama-cpp-python), the prompt evaluated once and its state saved, so
    each timed run decodes from the same KV as the other runtimes' rows."""

    def __init__(self, path: Path, prompt: list[int], threads: int | None, room: int, log: Path):
        import llama_cpp

        from ..targets.gguf_export import last_log_line, stderr_to

        n = threads or os.cpu_count() or 1
        try:
            with stderr_to(log):  # llama.cpp logs its load from C
                self.llm = llama_cpp.Llama(str(path), n_ctx=room, n_threads=n, n_threads_batch=n, verbose=False)
        except ValueError as e:  # llama-cpp-python's word for a file llama.cpp refused
            raise GriffinError(f"llama.cpp could not load {path.name}: {last_log_line(log) or e}") from None
        self.llm.eval(prompt)
        self.state = self.llm.save_state()
        self.n_vocab = self.llm.n_vocab()
        self._get_logits = llama_cpp.llama_get_logits  # bound once, outside the timed loop

    def _next(self) -> int:
        # the last position's logits from the context (without logits_all, Llama.eval leaves
        # its `scores` at zero)
        return int(np.argmax(np.ctypeslib.as_array(self._get_logits(self.llm.ctx), shape=(self.n_vocab,))))

    def decode_seconds(self, n: int) -> float:
        self.llm.load_state(self.state)
        tok = self._next()
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._next()
        return time.perf_counter() - t0


def _llama_cpp_file(lm: LoadedModel, path: Path, bundle, quant: str, threads: int | None) -> Path:
    """The GGUF llama.cpp runs for a config: the base GGUF itself when it already has the file type
    (what a user runs), else the base requantized by llama.cpp; a bundle's pruned GGUF."""
    from ..targets.gguf_export import (
        base_gguf,
        file_type,
        llama_quantize,
        write_pruned_gguf,
    )

    base = base_gguf(lm.identity, None, None)
    if bundle is not None:
        return write_pruned_gguf(bundle, base, path, quant, threads=threads)
    if file_type(base) == quant:
        return base
    llama_quantize(base, path, quant, threads)
    return path


def _genai_model(directory: Path, threads: int | None):
    import onnxruntime_genai as og

    if threads:  # og reads session options from genai_config.json
        cfg_path = directory / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return og.Model(str(directory))


def _genai_builder_graph(lm: LoadedModel, directory: Path, provider: str) -> Path:
    """The full model written by onnxruntime-genai's own builder, from the same weights (saved as
    an HF directory first: the builder loads with from_pretrained)."""
    import subprocess
    import sys

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


def run_bench(model: str | None = None, *, gguf_file: str | None = None, dtype: str = "float32",
              device: str = "cpu", settings: BenchSettings | None = None, lm: LoadedModel | None = None,
              ids: torch.Tensor | None = None, prompt_source: str | None = None) -> dict:
    """The benchmark on row `settings.row` of the data, or on given prompt `ids` [1, T] (e.g.
    random tokens for a model with random weights; `prompt_source` then says what they are)."""
    s = settings or BenchSettings()
    if s.threads:
        torch.set_num_threads(s.threads)
    lm = lm or load_model(model, gguf_file=gguf_file, dtype=dtype, device=device, quiet=True)
    _ = lm.fingerprint  # hashed once here, not inside the timed export
    if ids is None:
        data = find_data(s.data)
        ids, prompt_source = tokenize(lm, read_row(data, s.row)), f"row {s.row} of {data.name}"
    ids = ids.to(lm.device)
    check_context(lm.context_length, ids.shape[1] + s.new_tokens)

    base = copy.deepcopy(lm.model)  # untouched full model for the plain-prefill baseline
    full_read, full_ff = read_elements(base), _ff_elements(lm)
    export_settings = ExportSettings(density=0.5)
    # (runtime, config) -> (decode-seconds fn(n), k, bundle bytes, weight elements read per token, graph bytes)
    configs: dict[tuple[str, str], tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.safetensors"

        def export_once():
            write_bundle(export_ids(lm, ids, export_settings), out, force=True)

        prefill_s = median_seconds(lambda: prefill(base, ids), max(1, s.repeats // 2)) if s.time_export else None
        export_s = median_seconds(export_once, max(1, s.repeats // 2)) if s.time_export else None

        cache, last = prefill(base, ids)
        kv = cache_tensors(cache)
        first, T = int(last.argmax()), ids.shape[1]
        # KV elements one step reads, on average over the timed steps (every cached position of
        # every layer's key and value; a sliding layer's window at most)
        kv_read = sum((k.numel() + v.numel()) / k.shape[2] * min(k.shape[2] + s.new_tokens / 2, T + s.new_tokens / 2)
                      for k, v in kv)
        prompt = ids[0].tolist()
        torch_fn = lambda m: lambda n: _decode_seconds(m, kv, T, first, n)  # noqa: E731
        lean_fn = lambda d: lambda n: _lean_decode_seconds(d, kv, T, first, n)  # noqa: E731
        onnx_fn = lambda rt: lambda n: _onnx_decode_seconds(rt, kv, T, first, n)  # noqa: E731
        genai_fn = lambda m: lambda n: _genai_decode_seconds(m, prompt, n)  # noqa: E731
        lean_room = T + s.new_tokens + 8

        def lean_decoder(model):
            from ..runtime.lean import LeanDecoder

            # compiled (CUDA graphs) on a GPU; eager on the CPU, where compiling measured no faster
            cuda = lm.device.type == "cuda"
            return LeanDecoder(copy.deepcopy(model), lean_room, compile=cuda, static_length=lean_room)

        def add(name: str, bundle, k, bundle_bytes: int, read: int, model) -> None:
            """Every runtime's row for one configuration (bundle None: the full model)."""
            nonlocal onnx_provider
            if "torch" in s.runtimes:
                configs[("torch", name)] = (torch_fn(model), k, bundle_bytes, read, None)
            if "torch-lean" in s.runtimes:
                configs[("torch-lean", name)] = (lean_fn(lean_decoder(model)), k, bundle_bytes, read, None)
            for runtime, graph, quantized in _ONNX_ROWS:
                genai = runtime == "onnx-lean" and "genai" in s.runtimes
                if runtime in s.runtimes or genai:
                    directory = Path(tmp) / f"{runtime}-{name}"
                    ort_rt, size = _onnx_config(lm, directory, bundle, s.threads, s.onnx_provider, graph,
                                                s.quantize if quantized else None)
                    onnx_provider = ort_rt.provider
                    if runtime in s.runtimes:
                        configs[(runtime, name)] = (onnx_fn(ort_rt), k, bundle_bytes, read, size)
                        if bundle is None and s.time_export:  # the full graph's prefill of the prompt
                            prefill_times[(runtime, name)] = median_seconds(lambda: ort_rt.prefill(ids),
                                                                          max(1, s.repeats // 2))
                    if genai:
                        key = ("genai", name if name != "full" else "lean full")
                        configs[key] = (genai_fn(_genai_model(directory, s.threads)), k, bundle_bytes, read, size)
            if "llama.cpp" in s.runtimes:
                path = _llama_cpp_file(lm, Path(tmp) / f"llama.cpp-{name}.gguf", bundle, s.gguf_quant, s.threads)
                llm = _LlamaCpp(path, prompt, s.threads, lean_room, Path(tmp) / "llama.cpp.log")
                configs[("llama.cpp", name)] = (llm.decode_seconds, k, bundle_bytes, read, path.stat().st_size)

        onnx_provider = None
        prefill_times: dict[tuple[str, str], float] = {}
        if "genai" in s.runtimes:  # its own builder's full model first: the genai rows' reference
            graph = _genai_builder_graph(lm, Path(tmp), s.onnx_provider)
            configs[("genai", "full")] = (genai_fn(_genai_model(graph, s.threads)), None, 0, full_read,
                                          _graph_bytes(graph))
        add("full", None, None, 0, full_read, base)
        for method, d in tqdm([(m, d) for m in s.methods for d in s.densities], desc="bundles (and graphs)",
                              leave=False):
            bundle = export_ids(lm, ids, ExportSettings(density=d, method=method))
            write_bundle(bundle, out, force=True)
            bundle_bytes, name = out.stat().st_size, config_name(method, d)
            read = full_read - full_ff + sum(t.numel() for t in bundle.weights.values())
            model = None
            if "torch" in s.runtimes or "torch-lean" in s.runtimes:
                model = TorchRuntime(LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.identity, lm.spec,
                                                 lm.fingerprint), bundle, lean=False).lm.model
                read = read_elements(model)
            add(name, bundle, bundle.info.k, bundle_bytes, read, model)

    times: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
    for fn, *_ in configs.values():  # warm-up, excluded
        fn(min(8, s.new_tokens))
    for _ in tqdm(range(s.repeats), desc="decode repeats", leave=False):
        for key, (fn, *_) in configs.items():
            times[key].append(fn(s.new_tokens))

    def reference(runtime: str, name: str) -> str:
        """The row a config is compared with: the same runtime's full model (genai: our lean full graph
        under genai for our pruned graphs, so the ratio is the pruning's alone)."""
        return "lean full" if runtime == "genai" and name not in ("full", "lean full") else "full"

    rows = []
    for (runtime, name), (_, k, size, read, graph_bytes) in configs.items():
        ref = reference(runtime, name)
        tps = s.new_tokens / statistics.median(times[(runtime, name)])
        full_tps = s.new_tokens / statistics.median(times[(runtime, ref)])
        # per-repeat ratios (each repeat times every config once, side by side): their spread
        per_repeat = sorted(a / b for a, b in zip(times[(runtime, ref)], times[(runtime, name)]))
        ks = k or [lm.d_ff]
        row = {"runtime": runtime, "config": name, "k": round(sum(ks) / len(ks)), "decode_tok_s": tps,
               "speedup": tps / full_tps, "bound": full_read / read,
               "bound_with_kv": (full_read + kv_read) / (read + kv_read), "bundle_bytes": size, "vs": ref,
               "speedup_quartiles": [_quantile(per_repeat, 0.25), _quantile(per_repeat, 0.75)]}
        if not (runtime.endswith("-int4") or runtime == "llama.cpp"):  # 4-bit rows: see graph_bytes
            row["weight_bytes"] = read * lm.dtype.itemsize
        if len(set(ks)) > 1:  # per-layer widths (e.g. topk_refit_edges): "k" is their mean
            row["k_per_layer"] = ks
        if graph_bytes is not None:
            row["graph_bytes"] = graph_bytes
        if (runtime, name) in prefill_times:
            row["prefill_s"] = prefill_times[(runtime, name)]
        if ("llama.cpp", "full") in times:  # the tool users pick instead: llama.cpp on the full GGUF
            lcpp = times[("llama.cpp", "full")]
            row["vs_llama_cpp"] = statistics.median(lcpp) / statistics.median(times[(runtime, name)])
            row["vs_llama_cpp_quartiles"] = [_quantile(sorted(a / b for a, b in zip(lcpp, times[(runtime, name)])), q)
                                             for q in (0.25, 0.75)]
        rows.append(row)
    rows.sort(key=lambda row: RUNTIMES.index(row["runtime"]))  # grouped by runtime, full model first
    onnx_info = {}
    if onnx_provider is not None:
        import onnxruntime

        onnx_info = {"onnxruntime": onnxruntime.__version__, "onnx_provider": onnx_provider}
    if "genai" in s.runtimes:
        import onnxruntime_genai

        onnx_info["onnxruntime_genai"] = onnxruntime_genai.__version__
    return {
        "model": lm.identity, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device), "machine": machine(), "prompt": prompt_source,
        "prompt_tokens": ids.shape[1], "new_tokens": s.new_tokens, "repeats": s.repeats,
        "prefill_s": prefill_s, "export_s": export_s,
        "export_over_prefill": export_s / prefill_s if s.time_export else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "runtimes": list(s.runtimes), **onnx_info, **_quant_info(s),
        "rows": rows,
    }


def _quant_info(s: BenchSettings) -> dict:
    """What the 4-bit rows ran: the int4 settings, llama.cpp's file type and version."""
    info = {}
    if any(r.endswith("-int4") for r in s.runtimes):
        from ..targets.onnx.int4 import describe

        info["int4"] = describe(s.quantize)
    if "llama.cpp" in s.runtimes:
        import llama_cpp

        info.update(gguf_quant=s.gguf_quant, llama_cpp_python=llama_cpp.__version__)
    return info


def _quantile(sorted_values: list[float], q: float) -> float:
    i = q * (len(sorted_values) - 1)
    lo = int(i)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def format_table(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"model {r['model']} ({r['dtype']}, {r['device']}), {m['cpu']}, {m['torch_threads']} torch threads",
        f"prompt: {r['prompt']} ({r['prompt_tokens']} tokens); "
        f"decode {r['new_tokens']} tokens, median of {r['repeats']} interleaved repeats",
        "",
    ]
    if "onnxruntime" in r:
        genai = f"; onnxruntime-genai {r['onnxruntime_genai']}" if "onnxruntime_genai" in r else ""
        lines[-1:-1] = [f"onnx rows: ONNX Runtime {r['onnxruntime']}, {r['onnx_provider']}{genai}; "
                        "'vs full' compares with the same runtime's full model"]
    if "int4" in r:
        lines[-1:-1] = [f"-int4 rows: MatMulNBits int4, {r['int4']}"]
    if "gguf_quant" in r:
        lines[-1:-1] = [f"llama.cpp rows: {r['gguf_quant']} GGUF files (llama-cpp-python {r['llama_cpp_python']}); "
                        "'vs llama.cpp' compares with llama.cpp on the full model's GGUF"]
    lcpp = any("vs_llama_cpp" in row for row in r["rows"])
    lines += [
        "| runtime | config | k / layer | decode tok/s | vs full | (quartiles of repeats) | "
        + ("vs llama.cpp | (quartiles) | " if lcpp else "") + "bytes-read bound | bound with KV | bundle size |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if lcpp else ""),
    ]
    for row in r["rows"]:
        kv = f"{row['bound_with_kv']:.2f}×" if "bound_with_kv" in row else "—"
        vs = ""
        if lcpp:
            q = row["vs_llama_cpp_quartiles"]
            vs = f"{row['vs_llama_cpp']:.2f}× | {q[0]:.2f}–{q[1]:.2f} | "
        lines.append(f"| {row.get('runtime', 'torch')} | {config_label(row['config'])} | {k_text(row)} | "
                     f"{row['decode_tok_s']:.1f} | {row['speedup']:.2f}× | {_quartiles(row)} | {vs}{row['bound']:.2f}× | "
                     f"{kv} | {_size(row)} |")
    lines.append("")
    if r["export_s"] is not None:
        lines.append(f"export (prefill + statistic + selection + write, density 0.5): {r['export_s']:.2f} s; "
                     f"plain prefill: {r['prefill_s']:.2f} s; ratio {r['export_over_prefill']:.2f}×")
    for row in r["rows"]:
        if "prefill_s" in row:
            lines.append(f"{row['runtime']} full graph, prefill of the {r['prompt_tokens']}-token prompt: "
                         f"{row['prefill_s']:.2f} s")
    lines += [
        f"peak RSS of the benchmark process (holds all configurations at once): {r['peak_rss_bytes'] / 1e9:.2f} GB",
    ]
    return "\n".join(lines)


def config_label(config: str) -> str:
    """'full model', 'density 0.5', 'topk_refit density 0.5'; the genai rows' 'lean full' as is."""
    if config in ("full", "lean full"):
        return {"full": "full model", "lean full": "full model, our lean graph"}[config]
    method, density = parse_config(config)
    return f"{method} density {density:g}".removeprefix("topk ")


def _quartiles(row: dict) -> str:
    q = row.get("speedup_quartiles")
    if not q or row["config"] in ("full", "lean full"):
        return "—"
    return f"{q[0]:.2f}–{q[1]:.2f}"


def _size(row: dict) -> str:
    return f"{row['bundle_bytes'] / 1e6:.1f} MB" if row["bundle_bytes"] else "—"


def check_results_dir(directory: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """DIR/bench.json and DIR/bench.md, refused if they exist (without force) or DIR cannot be made."""
    from ..files.outputs import check_folder

    directory = check_folder(directory)
    paths = directory / "bench.json", directory / "bench.md"
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise GriffinError(f"{', '.join(existing)} exists; pass --force to overwrite")
    return paths


def write_results(r: dict, directory: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """DIR/bench.json (the run_bench dict) and DIR/bench.md (the table), each written atomically."""
    from ..files.outputs import atomic_output

    paths = check_results_dir(directory, force)
    Path(directory).mkdir(exist_ok=True)
    for path, text in zip(paths, (json.dumps(r, indent=2) + "\n", format_table(r) + "\n")):
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
