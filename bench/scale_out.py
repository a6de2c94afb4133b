"""Scaling-out measurements: whole `griffin-export` commands, each in its own process, timed and
with the peak RSS of that process (os.wait4; Ray's worker processes are not included in it).

    python bench/scale_out.py class [--prompts 200] [--workers 2] [--batch-size 8]
        prompts/s of `griffin-export class` on XSum articles: one process, --batch-size, --engine ray
    python bench/scale_out.py long [--tokens 8000] [--methods topk,topk_refit]
        export of one long prompt (XSum articles joined) on the default model: time and peak RSS,
        beside a process that only loads the model

Each command's wall time includes loading the model (and, for Ray, starting the local cluster
and loading the model in every worker), as a user running it would see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "xsum_dev.jsonl"


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command run to completion; it must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{err[-2000:]}")
    print(f"  {out.strip().splitlines()[-1] if out.strip() else ''}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is in kB on Linux


def griffin(*args: str) -> list[str]:
    return [sys.executable, "-m", "griffin_export_cli.main", *args]


def class_bench(ns: argparse.Namespace, tmp: Path) -> None:
    common = ["class", str(DATA), "--field", "article", "--limit", str(ns.prompts), "--name", "news", "-q", "--force"]
    runs = [("1 process", []), (f"--batch-size {ns.batch_size}", ["--batch-size", str(ns.batch_size)]),
            (f"--engine ray --workers {ns.workers}", ["--engine", "ray", "--workers", str(ns.workers)])]
    print(f"| `griffin-export class`, {ns.prompts} XSum articles | wall | prompts/s | peak RSS (driver) |")
    print("|---|---:|---:|---:|")
    for label, extra in runs:
        wall, rss = measure(griffin(*common, *extra, "-o", str(tmp / "news.safetensors")))
        print(f"| {label} | {wall:.0f} s | {ns.prompts / wall:.2f} | {rss:.2f} GB |", flush=True)


def long_prompt(tokens: int) -> str:
    """XSum articles joined until `tokens` tokens of the default model's tokenizer, cut there."""
    from griffin_export.model.load import load_model

    tok = load_model(quiet=True).tokenizer
    text = ""
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            text += json.loads(line)["article"] + "\n\n"
            if len(tok(text)["input_ids"]) > tokens + 50:
                break
    ids = tok(text)["input_ids"][:tokens]
    return tok.decode(ids)


def long_bench(ns: argparse.Namespace, tmp: Path) -> None:
    prompt = tmp / "long.txt"
    prompt.write_text(long_prompt(ns.tokens), encoding="utf-8")
    short = tmp / "short.txt"
    short.write_text(long_prompt(1000), encoding="utf-8")
    # the model's weights are memory-mapped: they count in RSS once a forward has read them all,
    # so the baseline is the model loaded and run on one token
    model_only = [sys.executable, "-c", "import torch; from griffin_export.model.load import load_model; "
                  "from griffin_export.model.prefill import forward, new_cache; lm = load_model(quiet=True); "
                  "forward(lm.model, torch.tensor([[1]]), new_cache(lm.model))"]
    wall, base = measure(model_only)
    print("| default model (float32), one export | wall | peak RSS | over the model |")
    print("|---|---:|---:|---:|")
    print(f"| load the model, run one token | {wall:.1f} s | {base:.2f} GB | - |", flush=True)
    for method in ns.methods.split(","):
        for text, tokens in ((short, 1000), (prompt, ns.tokens)):
            out = tmp / f"{method}.safetensors"
            wall, rss = measure(griffin(str(text), "-o", str(out), "--method", method, "-q", "--force"))
            size = out.stat().st_size / 1e6
            print(f"| {tokens}-token prompt, --method {method} (warm-up 8; {size:.0f} MB bundle with KV) | "
                  f"{wall:.1f} s | {rss:.2f} GB | +{rss - base:.2f} GB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("class")
    c.add_argument("--prompts", type=int, default=200)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--batch-size", type=int, default=8)
    lo = sub.add_parser("long")
    lo.add_argument("--tokens", type=int, default=8000)
    lo.add_argument("--methods", default="topk,topk_refit")
    ns = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="griffin-scale-"))
    try:
        (class_bench if ns.what == "class" else long_bench)(ns, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
