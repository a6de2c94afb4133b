"""Memory of serving N classes: one process holding the base model once and every class's FF slices (the
serve command's PyTorch backend), against one process per class holding the full model (what serving each
class by a model of its own costs), and against one process per class holding that class's standalone
pruned model (its experts only, every token through them).

    python -m bench.serve_memory classes/c-1.safetensors classes/c-2.safetensors ... [--counts 1,2,4] [-o DIR]
    python -m bench.serve_memory --router classes/router.safetensors [--counts 1,2,4,5]

Each configuration is measured in a fresh child process once its model is built (the lean step's packed
weights included, as serving holds them): its resident set, and the anonymous part of it (/proc/self/
smaps_rollup). "N × full model: resident" is N times a full-model process's resident set, interpreter
included (N processes each pay it); "file pages shared" counts the file pages (the mapped model file,
libraries) once, what N processes on one machine would share at best. Tensor bytes are counted too (what
the weights hold, without the allocator's or the interpreter's share). Sizes are MB (10^6 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.serve_load import finish


def memory_mb() -> dict[str, float]:
    """This process's resident set, and its anonymous part (its own heap: what another process cannot share;
    the rest is file pages, shared by processes that map the same files)."""
    gc.collect()
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0]) * 1024 / 1e6
    return {"rss_mb": fields["Rss"], "anon_mb": fields["Anonymous"]}


def tensor_bytes(model) -> int:
    """What the model's parameters hold, each tensor once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def child(mode: str, bundles: list[str], model: str | None, threads: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from griffin_export.bundle.format import read_bundle
    from griffin_export.model.load import load_model
    from griffin_export.runtime.pytorch import TorchRuntime
    from griffin_export.serve.backends import ClassRuntime, load_torch
    from griffin_export.settings import ServeSettings

    torch.set_num_threads(threads)
    base = memory_mb()["rss_mb"]
    if mode == "shared":
        backend = load_torch(ServeSettings(bundles=tuple(bundles), model=model, threads=threads))
        held = backend.class_bytes()
        weights = tensor_bytes(backend.rt.lm.model) + sum(b for name, b in held.items() if name != "full")
    else:
        bundle = read_bundle(bundles[0], load_kv=False)
        lm = load_model(model or bundle.info.base_model, dtype=bundle.info.dtype, quiet=True)
        # the class's experts installed and the full FF dropped (a standalone pruned model), or the full model
        rt = TorchRuntime(lm, bundle, pruned_prefill=True) if mode == "pruned" else ClassRuntime(lm, {})
        rt.prepare()  # the lean step's packed weights, as serving holds them
        weights = tensor_bytes(lm.model)
    return {"mode": mode, "classes": len(bundles), "interpreter_mb": base, **memory_mb(), "weights_mb": weights / 1e6}


def measure(mode: str, bundles: list[str], model: str | None, threads: int) -> dict:
    argv = [sys.executable, "-m", "bench.serve_memory", "--child", mode, "--threads", str(threads), *bundles]
    if model:
        argv += ["--model", model]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], full: dict, pruned: dict) -> str:
    def apart(n: int, one: dict) -> float:  # n processes: each its own heap, the file pages shared at best
        return n * one["anon_mb"] + one["rss_mb"] - one["anon_mb"]

    lines = ["| classes | one process: resident (MB) | its weights (MB) | N × full model: resident (MB) | "
             "N × full, file pages shared (MB) | N × pruned model, file pages shared (MB) | one process / N × full |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["classes"]
        lines.append(f"| {n} | {r['rss_mb']:.0f} | {r['weights_mb']:.0f} | {n * full['rss_mb']:.0f} | "
                     f"{apart(n, full):.0f} | {apart(n, pruned):.0f} | {r['rss_mb'] / n / full['rss_mb']:.2f} "
                     f"({r['rss_mb'] / apart(n, full):.2f} against shared file pages) |")
    lines.append(f"\nOne process with the full model: {full['rss_mb']:.0f} MB resident, {full['anon_mb']:.0f} MB of it "
                 f"anonymous ({full['weights_mb']:.0f} MB of weights, {full['interpreter_mb']:.0f} MB resident before "
                 f"loading); with one class's pruned model: {pruned['rss_mb']:.0f} MB ({pruned['anon_mb']:.0f} MB "
                 f"anonymous, {pruned['weights_mb']:.0f} MB of weights).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", help="class bundles (or --router for a router's)")
    ap.add_argument("--router", default=None)
    ap.add_argument("--model", default=None, help="the base model [default: the one the bundles record]")
    ap.add_argument("--counts", default=None, help="numbers of classes to measure, e.g. 1,2,4 [default: 1..all]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None, help="a folder for results.json and results.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(ns.child, ns.bundles, ns.model, ns.threads)))
        return
    bundles = list(ns.bundles)
    if ns.router:
        from griffin_export.classes.router import read_router

        bundles += [str(p) for p in read_router(ns.router).bundle_paths()]
    if not bundles:
        ap.error("give class bundles or --router")
    counts = [int(c) for c in ns.counts.split(",")] if ns.counts else list(range(1, len(bundles) + 1))
    if max(counts) > len(bundles):
        ap.error(f"--counts asks for {max(counts)} classes; {len(bundles)} given")
    t0 = time.perf_counter()
    full = measure("full", bundles[:1], ns.model, ns.threads)
    pruned = measure("pruned", bundles[:1], ns.model, ns.threads)
    rows = [measure("shared", bundles[:n], ns.model, ns.threads) for n in counts]
    finish("Serving memory", "serve_memory", table(rows, full, pruned), t0, ns.output,
           {"full": full, "pruned": pruned, "shared": rows})

if __name__ == "__main__":
    main()
