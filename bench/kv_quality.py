"""Quality of each KV cache type (issue #39): the same bundles decoded with float32, float16 and int8 KV
caches, paired against the float32 KV row by row.

    python -m bench.kv_quality --data bench/data/xsum_dev.jsonl --rows 200:300 --threads 1 -o reports/kv_quality
    python -m bench.kv_quality --data bench/data/xsum_dev.jsonl --rows 200:202 --threads 1 -o /tmp/kvq   # a try

Per XSum row: one export (`topk`, density 0.5, warm-up 8, as `griffin-export` writes it); then each
setting decodes that bundle from its KV (converted once to the setting's KV type) and scores the gold
summary (a full-model prefill of the prompt, into the setting's cache, then teacher-forced pruned steps,
as `griffin-export eval` scores it). Settings (--settings, comma-separated; default all):

    onnx:KV        the lean ONNX graph, float32 weights, KV float32 | float16 | int8
    onnx-int4:KV   the same with 4-bit MatMuls (the default int4 settings), KV float32 | int8
    torch:KV       the lean PyTorch step, KV float32 | float16
    llama.cpp:KV   llama.cpp on the base GGUF (the full model: a GGUF takes no bundle KV), KV F16 | Q8_0

ONNX graphs are exported once, from the first row's bundle (every later bundle swapped in, as a
deployment swaps them); the int8 graphs' scales come from the calibration text, never from these rows.
Per setting: ROUGE-L against the gold summary, ROUGE-L agreement with its family's reference (float32
KV; llama.cpp's own default F16), the gold summary's mean log-likelihood per token; the paired
differences setting − reference with 95 % bootstrap intervals. Each row is appended to OUT/rows.jsonl
(resumable with the same arguments); OUT/summary.json and OUT/summary.md hold the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.xsum_quality import (
    add_common_args,
    fmt,
    gold_ll,
    intervals,
    open_rows,
    paired_diffs,
    read_recs,
    write_summary,
)
from griffin_export.evaluation.metrics import rouge
from griffin_export.evaluation.runner import continuation_ids
from griffin_export.method.export import export_ids
from griffin_export.model.decoding import decode, eos_ids
from griffin_export.model.load import LoadedModel, load_model
from griffin_export.model.tokens import tokenize
from griffin_export.runtime.onnx import OnnxRuntime
from griffin_export.runtime.pytorch import TorchRuntime
from griffin_export.settings import DecodeOptions, QuantSettings
from griffin_export.targets.onnx.export import export_onnx

SETTINGS = ("onnx:float32", "onnx:float16", "onnx:int8", "onnx-int4:float32", "onnx-int4:int8",
            "torch:float32", "torch:float16", "llama.cpp:F16", "llama.cpp:Q8_0")
REFERENCE = {"onnx": "onnx:float32", "onnx-int4": "onnx-int4:float32", "torch": "torch:float32",
             "llama.cpp": "llama.cpp:F16"}


def family(setting: str) -> str:
    return setting.split(":")[0]


class Onnx:
    """An ONNX setting: the bundle's graph and the full model's graph of one KV type (the full graph prefills)."""

    def __init__(self, lm, first, tmp: Path, kv: str, int4: bool, threads: int):
        q = QuantSettings() if int4 else None
        full = tmp / f"full-{kv}"  # float32 weights: the prefill's, shared by both families
        self.full = full if full.exists() else export_onnx(lm, full, None, kv_dtype=kv)
        self.graph = export_onnx(lm, tmp / f"{'int4' if int4 else 'fp32'}-{kv}", first, quantize=q, kv_dtype=kv)
        self.threads = threads

    def run(self, bundle, ids, cont, opts) -> tuple[str, float]:
        rt = OnnxRuntime(self.graph, bundle, full=self.full, provider="cpu", threads=self.threads)
        text = rt.generate(opts).text
        state, first = rt.start(ids)
        return text, gold_ll(lambda t: rt.step(state, t), first, cont)


class Torch:
    """The lean PyTorch step with the bundle's experts in a copy of the model."""

    def __init__(self, lm, kv: str):
        self.lm, self.kv = lm, kv

    def run(self, bundle, ids, cont, opts) -> tuple[str, float]:
        lm = self.lm
        model = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.identity, lm.spec, lm.fingerprint)
        rt = TorchRuntime(model, bundle, keep_full=True, kv_dtype=self.kv)
        text = rt.generate(opts).text
        cache, first = rt.start(ids)
        room = ids.shape[1] + len(cont.ids) + 1
        return text, gold_ll(rt.stepper(cache, ids.shape[1], room), first, cont)


class LlamaCpp:
    """llama.cpp on the base GGUF (the full model), its KV cache of one type, flash attention on."""

    def __init__(self, lm, kv: str, threads: int, n_ctx: int):
        import llama_cpp

        from griffin_export.targets.gguf_export import base_gguf

        t = getattr(llama_cpp, f"GGML_TYPE_{kv}")
        self.llm = llama_cpp.Llama(str(base_gguf(lm.identity, None, None)), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, type_k=t, type_v=t, flash_attn=True, verbose=False)
        self.tokenizer, self.eos = lm.tokenizer, eos_ids(lm.config, lm.tokenizer)

    def _logits(self) -> torch.Tensor:
        """The last position's logits, from the context (without logits_all, eval keeps no scores)."""
        import llama_cpp

        n = self.llm.n_vocab()
        return torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(n,)).copy())

    def run(self, bundle, ids, cont, opts) -> tuple[str, float]:
        prompt = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(prompt)
        first = self._logits()
        state = self.llm.save_state()

        def step(tok: int) -> torch.Tensor:
            self.llm.eval([tok])
            return self._logits()

        text = decode(step, first, opts, tokenizer=self.tokenizer, eos=self.eos).text
        self.llm.load_state(state)
        return text, gold_ll(step, first, cont)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, threads=1)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    a = ap.parse_args(argv)
    settings = [x for x in a.settings.split(",") if x]
    unknown = [x for x in settings if x not in SETTINGS]
    if unknown or any(REFERENCE[family(x)] not in settings for x in settings):
        raise SystemExit(f"bad --settings {a.settings!r}: each of {', '.join(SETTINGS)}, with its family's reference "
                         f"({', '.join(REFERENCE.values())})")
    rows, rows_path, done, export = open_rows(a)
    out = rows_path.parent
    lm = load_model(None, quiet=True)
    tmp = Path(tempfile.mkdtemp(prefix="kv-quality."))
    first = export_ids(lm, tokenize(lm, rows[0].prompt), export)
    runners = {}
    for s in settings:
        fam, kv = s.split(":")
        if fam.startswith("onnx"):
            runners[s] = Onnx(lm, first, tmp, kv, fam == "onnx-int4", a.threads)
        elif fam == "torch":
            runners[s] = Torch(lm, kv)
        else:
            runners[s] = LlamaCpp(lm, kv, a.threads, lm.context_length or 8192)
    with rows_path.open("a") as f:
        for row in tqdm([r for r in rows if r.index not in done], desc="kv quality", unit="prompt"):
            t0 = time.perf_counter()
            ids = tokenize(lm, row.prompt)
            cont = continuation_ids(lm.tokenizer, row.prompt, "\n", row.target, ids[0].tolist())
            bundle = export_ids(lm, ids, export)
            opts = DecodeOptions(max_new_tokens=row.max_tokens, stop=row.stop)
            rec = {"row": row.index, "prompt_tokens": ids.shape[1], "results": {}, "seconds": {}}
            for s in settings:  # references first: each family's agreement is with its own
                t1 = time.perf_counter()
                text, ll = runners[s].run(bundle, ids, cont, opts)
                rec["results"][s] = {"rougeL": rouge(text, row.target)["rougeL"], "gold_ll": ll, "text": text}
                rec["seconds"][s] = time.perf_counter() - t1
            for s in settings:
                ref = rec["results"][REFERENCE[family(s)]]["text"]
                rec["results"][s]["agree_rougeL"] = rouge(rec["results"][s]["text"], ref)["rougeL"]
            rec["seconds"]["row"] = time.perf_counter() - t0
            f.write(json.dumps(rec) + "\n")
            f.flush()
    summarize(out, a)


def summarize(out: Path, a) -> None:
    recs, names, col = read_recs(out)
    summary = {"rows": len(recs), "args": vars(a), "settings": {}, "diffs": {}}
    lines = [f"{len(recs)} XSum rows ({a.rows}), {a.method} density {a.density:g}, warm-up {a.warmup}, "
             f"{a.threads} threads; 95 % bootstrap intervals; agreement: ROUGE-L with the same runtime's float32-KV "
             "output (llama.cpp: its default F16, on the full model)", "",
             "| setting | ROUGE-L | agreement with its reference KV | gold log-lik / token | s / row |",
             "|---|---|---|---|---|"]
    for name in names:
        s = intervals(col, name)
        secs = float(np.mean([r["seconds"][name] for r in recs]))
        summary["settings"][name] = {**{k: v.as_dict() for k, v in s.items()}, "seconds_per_row": secs}
        lines.append(f"| {name} | {fmt(s['rougeL'])} | {fmt(s['agree'])} | {fmt(s['gold_ll'])} | {secs:.1f} |")
    for name in names:
        ref = REFERENCE[family(name)]
        if name == ref:
            continue
        summary["diffs"][name], diff_lines = paired_diffs(col, name, ref, digits=4)
        lines += ["", *diff_lines]
        same = sum(r["results"][name]["text"] == r["results"][ref]["text"] for r in recs)
        summary["diffs"][name]["same_text_rows"] = same
        lines.append(f"- the same text as {ref} in {same} of {len(recs)} rows")
    write_summary(out, summary, lines)


if __name__ == "__main__":
    sys.exit(main())
