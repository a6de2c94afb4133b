"""End-to-end time per request (the prompt's prefill and 64 new tokens) with routed class experts,
against the full model and against per-prompt experts, side by side in one process, interleaved
prompt by prompt and repeat by repeat. Every path decodes through the lean PyTorch step.

    python -m bench.routing_speed ROUTER --data bench/data/mixed_report.jsonl --per-kind 4 --repeats 3 --threads 2

- full: a full-model prefill, then 64 tokens of the full model;
- per-prompt: what `griffin-export PROMPT` + `generate` do for a new request: a full-model prefill with the
  statistic and the 8 warm-up tokens, the selection and slicing (export), the experts packed, then the
  other 56 tokens with them;
- routed: the router's partial prefill, the class's experts swapped in, a prefill through them, 64
  tokens with them (a guarded prompt runs the full model instead; counted as it runs).
The same 64 tokens are timed for each (no stop at end of sequence). Prints the median seconds per
request of each path, the ratio full / path per request (paired) with its quartiles, and the router's
share of the routed path's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from griffin_export.method.export import export_ids
from griffin_export.model.load import use_threads
from griffin_export.model.prefill import prefill
from griffin_export.runtime.routed import FULL, load_routed
from griffin_export.settings import DecodeOptions, ExportSettings

NEW_TOKENS = 64


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("router", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--per-kind", type=int, default=4, help="prompts of each kind (the first ones of the file)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the table and the raw times here")
    a = p.parse_args()
    use_threads(a.threads)
    rt = load_routed(a.router)
    rows = [json.loads(line) for line in a.data.read_text().splitlines()]
    picked, seen = [], {}
    for r in rows:
        if seen.get(r["kind"], 0) < a.per_kind:
            seen[r["kind"]] = seen.get(r["kind"], 0) + 1
            picked.append(r)
    ids = [rt.tokenize(r["prompt"]) for r in picked]
    opts = DecodeOptions(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    base = super(type(rt), rt)  # the decoding of whatever experts are active, without routing

    def full(x: torch.Tensor) -> None:
        rt.experts.activate(FULL)
        base.generate(opts, ids=x)

    def per_prompt(x: torch.Tensor) -> None:
        rt.experts.activate(FULL)
        bundle = export_ids(rt.lm, x, ExportSettings())  # full prefill, statistic, 8 warm-up tokens, selection
        rt.experts.add("prompt", bundle)
        rt.experts.activate("prompt")
        lean = rt.experts.lean
        lean.reserve(bundle.cached_tokens + NEW_TOKENS)
        lean.load_cache(bundle.kv, bundle.cached_tokens)
        tok = int(bundle.last_logits.argmax())
        for _ in range(NEW_TOKENS - len(bundle.warmup())):
            tok = int(lean.step(tok).argmax())
        rt.experts.remove("prompt")

    router_s: list[float] = []

    def routed(x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        r = rt.route(x)
        router_s.append(time.perf_counter() - t0)
        rt.experts.activate(rt.choice(r))
        base.generate(opts, ids=x)

    paths = {"full": full, "per-prompt": per_prompt, "routed": routed}
    for fn in paths.values():  # warm-up, not timed
        fn(ids[0])
    router_s.clear()
    times: dict[str, list[float]] = {name: [] for name in paths}
    prefill_s: list[float] = []  # a plain full-model prefill of each prompt: what the router's cost is a fraction of
    for _ in range(a.repeats):
        for x in ids:
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
            rt.experts.activate(FULL)
            t0 = time.perf_counter()
            prefill(rt.lm.model, x)
            prefill_s.append(time.perf_counter() - t0)
    tokens = [int(x.shape[1]) for x in ids]
    lines = [f"{len(ids)} prompts of {a.data.name} ({a.per_kind} per kind, {min(tokens)}..{max(tokens)} tokens, mean "
             f"{sum(tokens) / len(tokens):.0f}), {NEW_TOKENS} new tokens, {a.repeats} interleaved repeats, "
             f"{torch.get_num_threads()} threads", "",
             "| path | median s / request | full / path (median per request) | quartiles |", "|---|---|---|---|"]
    for name in paths:
        ratios = [f / t for f, t in zip(times["full"], times[name])]
        q = quartiles(ratios)
        lines.append(f"| {name} | {statistics.median(times[name]):.2f} | {statistics.median(ratios):.2f}× | "
                     f"{q[0]:.2f}–{q[1]:.2f} |")
    share = statistics.median([r / t for r, t in zip(router_s, times["routed"])])
    cost = statistics.median([r / p for r, p in zip(router_s, prefill_s)])
    lines += ["", f"the router's partial prefill: median {statistics.median(router_s) * 1000:.0f} ms, "
              f"{100 * cost:.1f} % of a full-model prefill of the same prompt (median per prompt; the full prefill "
              f"{statistics.median(prefill_s) * 1000:.0f} ms), {100 * share:.1f} % of a routed request"]
    text = "\n".join(lines)
    print(text)
    if a.output:
        a.output.mkdir(parents=True, exist_ok=True)
        (a.output / "speed.md").write_text(text + "\n")
        (a.output / "speed.json").write_text(json.dumps({"times": times, "router_s": router_s, "prefill_s": prefill_s,
                                                         "tokens": tokens}, indent=1) + "\n")


if __name__ == "__main__":
    main()
