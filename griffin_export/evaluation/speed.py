"""Speed benchmark: full model vs bundles, side by side in one process, per runtime.

Every ratio is measured within one run: configurations (of every runtime) are interleaved
repeat by repeat so drift on a noisy machine hits them alike, and medians are reported.
Each "vs full" ratio compares a runtime's pruned decode with the same runtime's full model.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..bundle.format import write_bundle
from ..errors import GriffinError
from ..method.budget import k_text
from ..method.export import export_ids, precheck
from ..model.load import LoadedModel, ModelSource, use_threads
from ..model.prefill import cache_tensors, prefill
from ..model.tokens import check_context, tokenize
from ..registry import BENCH_RUNTIMES, bench_runtime
from ..runtime.timing import KV_VALUE_BYTES, BenchContext, BenchRow, median_seconds
from ..settings import DEFAULT_DATA, LLAMA_KV_TYPE, BenchSettings, ExportSettings
from .provenance import machine
from .settings import config_name, parse_config



def find_data(data: str | None) -> Path:
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise GriffinError(f"data file {data} does not exist")
        return path
    here = Path.cwd()
    for base in (here, *here.parents):  # the repository's copy, from anywhere in the checkout
        if (base / DEFAULT_DATA).is_file():
            return base / DEFAULT_DATA
    raise GriffinError(f"no data given and no {DEFAULT_DATA} found above {here}; pass data=FILE.jsonl")


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


# the read bandwidth the bound columns divide by: one sum over a buffer larger than the caches most
# CPUs have, with the benchmark's threads, the best of BANDWIDTH_REPEATS after BANDWIDTH_WARMUP
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_REPEATS, BANDWIDTH_WARMUP = 10, 3


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes per second torch reads with its current threads: float32 sums of an nbytes tensor (a
    streaming read, as a decode step's weights are), the fastest of BANDWIDTH_REPEATS."""
    import time

    t = torch.ones(nbytes // 4)
    for _ in range(BANDWIDTH_WARMUP):  # pages touched, clocks up
        t.sum()
    best = float("inf")
    for _ in range(BANDWIDTH_REPEATS):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _ff_elements(lm: LoadedModel) -> int:
    """Elements of the full model's FF weights and biases."""
    from ..model.arch import ff_blocks

    total = 0
    for b in ff_blocks(lm.model, lm.spec):
        for lin in (*b.inputs.values(), b.output):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total


def run_bench(model: str | None = None, *, gguf_file: str | None = None, dtype: str = "float32",
              device: str = "cpu", settings: BenchSettings | None = None, lm: LoadedModel | None = None,
              ids: torch.Tensor | None = None, prompt_source: str | None = None) -> dict:
    """The benchmark on row `settings.row` of the data, or on given prompt `ids` [1, T] (e.g.
    random tokens for a model with random weights; `prompt_source` then says what they are).
    Each runtime of `settings.runtimes` gives its rows (registry.RUNTIMES: the module's bench_rows)."""
    s = settings or BenchSettings()
    use_threads(s.threads)
    if lm is None:
        source = ModelSource(model, gguf_file, dtype, device)
        precheck(source, s.densities)  # the device, the architecture and the densities, before the weights load
        lm = source.load()
    _ = lm.fingerprint  # hashed once here, not inside the timed export
    if ids is None:
        data = find_data(s.data)
        ids, prompt_source = tokenize(lm, read_row(data, s.row)), f"row {s.row} of {data.name}"
    ids = ids.to(lm.device)
    check_context(lm.context_length, ids.shape[1] + s.new_tokens)

    full_read, full_ff = read_elements(lm.model), _ff_elements(lm)
    model_dtype = str(lm.dtype).replace("torch.", "")
    export_settings = ExportSettings(density=0.5)
    # (runtime, KV type, config) -> (row, k, bundle bytes, weight elements read per token)
    configs: dict[tuple[str, str, str], tuple[BenchRow, list[int] | None, int, int]] = {}
    skipped: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.safetensors"

        def export_once():
            write_bundle(export_ids(lm, ids, export_settings), out, force=True)

        prefill_s = median_seconds(lambda: prefill(lm.model, ids), max(1, s.repeats // 2)) if s.time_export else None
        export_s = median_seconds(export_once, max(1, s.repeats // 2)) if s.time_export else None

        cache, last = prefill(lm.model, ids)
        kv = cache_tensors(cache)
        T = ids.shape[1]
        ctx = BenchContext(lm, ids, kv, int(last.argmax()), s, Path(tmp))
        # KV elements one step reads, on average over the timed steps (every cached position of
        # every layer's key and value; a sliding layer's window at most)
        kv_read = sum((k.numel() + v.numel()) / k.shape[2] * min(k.shape[2] + s.new_tokens / 2, T + s.new_tokens / 2)
                      for k, v in kv)
        kv_positions = T + s.new_tokens / 2

        def add(name: str, bundle, k, bundle_bytes: int, read: int) -> None:
            """Every runtime's rows for one configuration (bundle None: the full model), at each KV type."""
            for variant in s.runtimes:
                code = bench_runtime(variant).code()
                for kv in _kv_dtypes(variant, getattr(code, "BENCH_KV_DTYPES", {}).get(variant), s.kv_dtypes, skipped):
                    rows = code.bench_rows(ctx, variant, bundle) if kv == "" else \
                        code.bench_rows(ctx, variant, bundle, kv_dtype=kv)
                    for suffix, row in rows.items():
                        configs[(variant, row.kv or model_dtype, suffix or name)] = (row, k, bundle_bytes, read)

        add("full", None, None, 0, full_read)
        for method, d in tqdm([(m, d) for m in s.methods for d in s.densities], desc="bundles (and graphs)",
                              leave=False):
            bundle = export_ids(lm, ids, ExportSettings(density=d, method=method))
            write_bundle(bundle, out, force=True)
            read = full_read - full_ff + sum(t.numel() for t in bundle.weights.values())
            add(config_name(method, d), bundle, bundle.info.k, out.stat().st_size, read)
        prefill_times = {key: median_seconds(row.prefill, max(1, s.repeats // 2))
                         for key, (row, *_) in configs.items() if row.prefill is not None and s.time_export}

        times: dict[tuple[str, str, str], list[float]] = {key: [] for key in configs}
        for row, *_ in configs.values():  # warm-up, excluded
            row.decode_seconds(min(8, s.new_tokens))
        bandwidth = [read_bandwidth()]  # before and after the repeats: the machine's best of the two
        for _ in tqdm(range(s.repeats), desc="decode repeats", leave=False):
            for key, (row, *_) in configs.items():
                times[key].append(row.decode_seconds(s.new_tokens))
        bandwidth.append(read_bandwidth())

    def weights(key) -> float:  # bytes of weights one step of this row reads
        row, _, _, read = configs[key]
        return row.weight_bytes if row.weight_bytes is not None else read * lm.dtype.itemsize

    limit = max(bandwidth)
    lcpp_ref = ("llama.cpp", LLAMA_KV_TYPE, "full")  # the tool users pick instead: llama.cpp, full GGUF, own KV
    rows = []
    for key, (bench_row, k, size, read) in configs.items():
        runtime, kv, name = key
        ref = (runtime, kv, bench_row.vs)
        tps = s.new_tokens / statistics.median(times[key])
        full_tps = s.new_tokens / statistics.median(times[ref])
        # per-repeat ratios (each repeat times every config once, side by side): their spread
        per_repeat = sorted(a / b for a, b in zip(times[ref], times[key]))
        kv_bytes = kv_read * KV_VALUE_BYTES[bench_row.kv_label or kv]
        w, w_ref = weights(key), weights(ref)
        ks = k or [lm.d_ff]
        row = {"runtime": runtime, "kv_dtype": kv, "config": name, "k": round(sum(ks) / len(ks)), "decode_tok_s": tps,
               "speedup": tps / full_tps, "bound": w_ref / w, "bound_with_kv": (w_ref + kv_bytes) / (w + kv_bytes),
               "weight_read_bytes": w, "kv_read_bytes": kv_bytes, "limit_tok_s": limit / (w + kv_bytes),
               "memory_fraction": tps * (w + kv_bytes) / limit, "bundle_bytes": size, "vs": bench_row.vs,
               "speedup_quartiles": [_quantile(per_repeat, 0.25), _quantile(per_repeat, 0.75)]}
        if bench_row.kv_label:
            row["kv_label"] = bench_row.kv_label
        if len(set(ks)) > 1:  # per-layer widths (e.g. topk_refit_edges): "k" is their mean
            row["k_per_layer"] = ks
        if bench_row.file_bytes is not None:
            row["graph_bytes"] = bench_row.file_bytes
        if key in prefill_times:
            row["prefill_s"] = prefill_times[key]
        if lcpp_ref in times:
            lcpp = times[lcpp_ref]
            row["vs_llama_cpp"] = statistics.median(lcpp) / statistics.median(times[key])
            row["vs_llama_cpp_quartiles"] = [_quantile(sorted(a / b for a, b in zip(lcpp, times[key])), q)
                                             for q in (0.25, 0.75)]
        rows.append(row)
    # grouped by runtime, then KV type, full model first
    rows.sort(key=lambda row: (list(BENCH_RUNTIMES).index(row["runtime"]), KV_ORDER.index(row["kv_dtype"])
                               if row["kv_dtype"] in KV_ORDER else len(KV_ORDER)))
    info = {key: value for row, *_ in configs.values() for key, value in row.info.items()}
    return {
        "model": lm.identity, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device), "machine": machine(), "prompt": prompt_source,
        "prompt_tokens": ids.shape[1], "new_tokens": s.new_tokens, "repeats": s.repeats,
        "prefill_s": prefill_s, "export_s": export_s,
        "export_over_prefill": export_s / prefill_s if s.time_export else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "runtimes": list(s.runtimes), **info,
        "read_bandwidth": limit, "read_bandwidth_runs": bandwidth, "kv_positions": kv_positions,
        "kv_skipped": sorted(skipped),
        "rows": rows,
    }


KV_ORDER = ("float32", "bfloat16", "float16", "int8")


def _kv_dtypes(variant: str, takes: tuple[str, ...] | None, requested: list[str] | None, skipped: set[str]) -> list:
    """The KV types a runtime variant is timed at: "" where it has no choice (its model's dtype);
    else each requested type it takes (None: its own default), and llama.cpp's default besides (the
    reference of every row's "vs llama.cpp")."""
    if takes is None:
        return [""]
    if requested is None:
        return [None]
    out = [kv for kv in requested if kv in takes]
    skipped.update(f"{variant} {kv}" for kv in requested if kv not in takes)
    if variant == "llama.cpp" and LLAMA_KV_TYPE not in out:
        out.insert(0, LLAMA_KV_TYPE)
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    i = q * (len(sorted_values) - 1)
    lo = int(i)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def format_table(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"model {r['model']} ({r['dtype']}, {r['device']}), {m['cpu']}, {m['torch_threads']} torch threads"
        + (f", OMP_WAIT_POLICY={m.get('omp_wait_policy') or 'unset'}" if "omp_wait_policy" in m else ""),
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
                        "flash attention with a Q8_0 cache only (it needs it), F16 and F32 without (llama-cpp-python's "
                        "default); 'vs llama.cpp' compares with llama.cpp on the full model's GGUF, F16 cache"]
    if "read_bandwidth" in r:
        runs = " / ".join(f"{b / 1e9:.1f}" for b in r["read_bandwidth_runs"])
        lines[-1:-1] = [(f"memory limit: {r['read_bandwidth'] / 1e9:.1f} GB/s read ({m['torch_threads']} threads, a "
                         f"float32 sum over 1 GiB, before / after the repeats: {runs} GB/s); each row reads its weights "
                         f"at their own precision and the KV of {r['kv_positions']:.0f} positions at its KV type, per "
                         "token; 'of limit' = decode tok/s × MB read ÷ the bandwidth")]
    if r.get("kv_skipped"):
        lines[-1:-1] = [f"not timed (no such KV type in that runtime): {', '.join(r['kv_skipped'])}"]
    lcpp = any("vs_llama_cpp" in row for row in r["rows"])
    lines += [
        "| runtime | KV | config | k / layer | decode tok/s | vs full | (quartiles of repeats) | "
        + ("vs llama.cpp | (quartiles) | " if lcpp else "")
        + "MB read / token | bytes-read bound | bound with KV | memory-limit tok/s | of limit | bundle size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if lcpp else ""),
    ]
    for row in r["rows"]:
        kv = f"{row['bound_with_kv']:.2f}×" if "bound_with_kv" in row else "—"
        vs = ""
        if lcpp:
            q = row["vs_llama_cpp_quartiles"]
            vs = f"{row['vs_llama_cpp']:.2f}× | {q[0]:.2f}–{q[1]:.2f} | "
        mb = lim = frac = "—"
        if "weight_read_bytes" in row:
            mb = f"{(row['weight_read_bytes'] + row['kv_read_bytes']) / 1e6:.1f}"
            lim, frac = f"{row['limit_tok_s']:.0f}", f"{100 * row['memory_fraction']:.0f} %"
        lines.append(f"| {row.get('runtime', 'torch')} | {row.get('kv_label') or row.get('kv_dtype', '—')} | "
                     f"{config_label(row['config'])} | {k_text(row)} | "
                     f"{row['decode_tok_s']:.1f} | {row['speedup']:.2f}× | {_quartiles(row)} | {vs}{mb} | "
                     f"{row['bound']:.2f}× | {kv} | {lim} | {frac} | {_size(row)} |")
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
        raise GriffinError(f"{', '.join(existing)} exists; pass force=True to overwrite")
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
