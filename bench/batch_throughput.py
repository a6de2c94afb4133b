"""Batched generation throughput: generated tokens/s of the full model and of a class bundle,
PyTorch or ONNX Runtime (--runtime), CPU, at several batch sizes, in one process (the settings interleaved over
`--repeats` rounds; the table shows medians and the pruned/full ratio per batch size).

    python bench/batch_throughput.py [--runtime torch|onnx] [--decoder lean|eager] [--batch-size 1,4,16]
                                     [--prompts 16] [--new-tokens 32]

--decoder lean (the default) decodes through the lean step (PyTorch, runtime/lean.py) or the lean
graph (ONNX Runtime, onnx_lean.py), each with its batch buffers; eager through transformers'
forward or the traced graph.

Prompts are XSum articles from bench/data/xsum_dev.jsonl (rows 0..N-1, cut to --max-prompt-tokens);
the class bundle is counted on rows 200..231 (topk, pooled). The "full" model is the class bundle
at density 1.0 (ONNX Runtime: the full model's own graph), so both go through the same batched code (runtime.generate_batch: full-model
prefill of each batch, then decode with the experts). Every sequence decodes --new-tokens tokens
(eos does not stop it), so both sides generate the same number of tokens. Throughput is given for
the whole generate_batch call (prefill and decode) and for the decoding alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from griffin_export.files.inputs import Prompt
from griffin_export.classes.build import export_class
from griffin_export.model.load import load_model
from griffin_export.runtime.pytorch import load_runtime
from griffin_export.settings import ClassSettings, DecodeOptions

DATA = Path(__file__).resolve().parent / "data" / "xsum_dev.jsonl"


def articles(rows: range, tokenizer, max_tokens: int) -> list[str]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    out = []
    for r in rows:
        ids = tokenizer(json.loads(lines[r])["article"])["input_ids"][:max_tokens]
        out.append(tokenizer.decode(ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", default="1,4,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--decoder", choices=["lean", "eager"], default="lean")
    ns = ap.parse_args()
    sizes = [int(x) for x in ns.batch_size.split(",")]
    base = load_model(quiet=True)
    prompts = articles(range(ns.prompts), base.tokenizer, ns.max_prompt_tokens)
    train = [Prompt(t, str(i)) for i, t in enumerate(articles(range(200, 232), base.tokenizer, ns.max_prompt_tokens))]
    runtimes = {}
    if ns.runtime == "torch":
        for name, density in (("full", 1.0), (f"class {ns.density}", ns.density)):
            bundle = export_class(base, train, ClassSettings("news", density=density)).bundle
            runtimes[name] = load_runtime(bundle, load_model(quiet=True), new_prompts=True,
                                          lean=None if ns.decoder == "lean" else False)
    else:  # ONNX Runtime: the full model's graph, the class's
        import tempfile

        from griffin_export.targets.onnx.export import export_onnx
        from griffin_export.runtime.onnx import OnnxRuntime

        tmp = Path(tempfile.mkdtemp(prefix="griffin-batch-"))
        bundle = export_class(base, train, ClassSettings("news", density=ns.density)).bundle
        graph = "lean" if ns.decoder == "lean" else "traced"
        export_onnx(base, tmp / "full", graph=graph)
        export_onnx(base, tmp / "class", bundle, graph=graph)
        runtimes["full"] = OnnxRuntime(tmp / "full", None, full=tmp / "full")
        runtimes[f"class {ns.density}"] = OnnxRuntime(tmp / "class", bundle, full=tmp / "full")
    opts = DecodeOptions(max_new_tokens=ns.new_tokens, stop_at_eos=False)
    times: dict[tuple[str, int], list[float]] = {}  # the whole generate_batch call
    decode: dict[tuple[str, int], list[float]] = {}  # its decoding: each batch's slowest sequence, summed
    for _ in range(ns.repeats):
        for b in sizes:
            for name, rt in runtimes.items():
                per_prompt: dict[int, float] = {}
                t0 = time.perf_counter()
                rt.generate_batch(prompts, opts, batch_size=b, on_done=lambda i, g: per_prompt.update({i: g.decode_s}))
                times.setdefault((name, b), []).append(time.perf_counter() - t0)
                decode.setdefault((name, b), []).append(
                    sum(max(per_prompt[i] for i in range(s, min(s + b, ns.prompts))) for s in range(0, ns.prompts, b)))
    tokens = ns.prompts * ns.new_tokens
    full, pruned = runtimes
    print(f"{ns.runtime} ({ns.decoder}): {ns.prompts} prompts (<= {ns.max_prompt_tokens} tokens), {ns.new_tokens} new tokens each, "
          f"{torch.get_num_threads()} threads, medians of {ns.repeats}; tok/s = generated tokens / seconds "
          "(whole: prefill + decode; decode: the decoding loops only)")
    print(f"| batch | {full} tok/s whole | {pruned} whole | ratio | {full} decode | {pruned} decode | ratio "
          f"| decode ratio per round | {pruned} decode vs batch {sizes[0]} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    one = tokens / statistics.median(decode[(pruned, sizes[0])])
    for b in sizes:
        fw, pw = (tokens / statistics.median(times[(n, b)]) for n in (full, pruned))
        fd, pd = (tokens / statistics.median(decode[(n, b)]) for n in (full, pruned))
        # the two settings of one round ran a minute apart at most: the spread of these is the noise
        rounds = sorted(f / p for f, p in zip(decode[(full, b)], decode[(pruned, b)]))
        print(f"| {b} | {fw:.1f} | {pw:.1f} | {pw / fw:.2f}× | {fd:.1f} | {pd:.1f} | {pd / fd:.2f}× "
              f"| {rounds[0]:.2f}–{rounds[-1]:.2f}× | {pd / one:.2f}× |")


if __name__ == "__main__":
    main()
