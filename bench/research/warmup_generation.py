"""Issue 8, the warm-up direction on generation: decode the first N tokens with the full model (as an
export would, storing them and their KV), add their activations to the statistic and the refit's Gram,
then let the pruned model continue greedily. ROUGE-L of the whole text (warm-up + continuation)
against the gold summary and against the full model's own output, on dev rows.

    python -m bench.research.warmup_generation --rows 5:25 --warmup 0,4,8,16 --methods topk,topk_refit_edges

N = 0 is the method as shipped. The warm-up tokens are the full model's greedy tokens, so they are
the start of the full model's own output: the comparison says how much of the pruned model's loss is
in the first tokens (the issue saw generations drift to the one-shot example's summary early).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.research import selection_search as search
from griffin_export.model.decoding import decode
from griffin_export.evaluation.metrics import mean_ci, rouge
from griffin_export.evaluation.runner import fresh_cache, pruned
from griffin_export.method.export import choose_experts
from griffin_export.model.prefill import cache_tensors, forward
from griffin_export.settings import DecodeOptions

STOP = "###"
MAX_TOKENS = 64


def cut(text: str) -> str:
    i = text.find(STOP)
    return text if i < 0 else text[:i]


def main(argv: list[str] | None = None) -> dict:
    p = search.arguments(__doc__, "5:25")
    p.add_argument("--warmup", default="0,4,8,16", help="warm-up lengths in tokens")
    p.add_argument("--methods", default="topk,topk_refit_edges")
    args = search.parse(p, argv)
    s = search.Search(argparse.Namespace(model=args.model, data=args.data, density=args.density, sensitivity_file=None))
    lm, tok = s.lm, s.lm.tokenizer
    warmups = [int(x) for x in args.warmup.split(",")]
    methods = args.methods.split(",")
    opts = DecodeOptions(max_new_tokens=MAX_TOKENS, stop=[STOP])
    per_row: dict[int, dict] = {}
    with torch.inference_mode():
        for row in args.rows:
            t0 = time.perf_counter()
            pr = s.prompt(row)
            T = pr.ids.shape[1]
            gold = s.data[row]["summary_gt"]
            cache = fresh_cache(lm.model, pr.kv, T)
            full = decode(lambda t: forward(lm.model, torch.tensor([[t]]), cache)[-1], pr.last, opts, tokenizer=tok)
            res = {"full": {"rougeL": rouge(full.text, gold)["rougeL"]}}
            for n in warmups:
                warm = full.token_ids[:n]  # the full model's own first tokens, fed as an export would
                cache = fresh_cache(lm.model, pr.kv, T)
                zw, logits = s.feed(cache, pr.last, tokens=warm) if warm else ([], pr.last)
                z = [torch.cat([a, w]) for a, w in zip(pr.z, zw)] if warm else pr.z
                kv = cache_tensors(cache)  # prompt + warm-up, as a bundle would store it
                scores, gram = search.statistic(z), search.grams(z)
                ended = len(warm) < n or STOP in tok.decode(warm)  # the full output ended inside the warm-up
                for method in methods:
                    ids = list(warm)
                    if not ended:
                        _, weights = choose_experts(lm, method, scores, args.density, 0, gram=gram)
                        c2 = fresh_cache(lm.model, kv, T + len(warm))
                        left = DecodeOptions(max_new_tokens=MAX_TOKENS - len(warm), stop=[STOP])
                        with pruned(s.ctx, weights):
                            ids += decode(lambda t: forward(lm.model, torch.tensor([[t]]), c2)[-1], logits, left,
                                          tokenizer=tok).token_ids
                    text = cut(tok.decode(ids, skip_special_tokens=True))
                    res[f"{method}+warm{n}"] = {"rougeL": rouge(text, gold)["rougeL"],
                                                "agree": rouge(text, full.text)["rougeL"], "text": text}
            per_row[row] = res
            print(f"row {row} ({time.perf_counter() - t0:.0f} s): "
                  + " ".join(f"{k}={v['rougeL']:.3f}" for k, v in res.items()), flush=True)
    keys = list(next(iter(per_row.values())))
    full_rl = [r["full"]["rougeL"] for r in per_row.values()]
    summary = {}
    print(f"\nrows {args.rows.start}:{args.rows.stop}, density {args.density}; ROUGE-L (mean, 95 % CI), and ROUGE-L "
          f"against the full model's output\n\n| setting | ROUGE-L | ÷ full (ratio of means) | agreement with full |\n|---|---|---|---|")
    for k in keys:
        rl = [r[k]["rougeL"] for r in per_row.values()]
        ci = mean_ci(rl)
        agree = mean_ci([r[k]["agree"] for r in per_row.values()]) if k != "full" else None
        summary[k] = {"rougeL": ci.mean, "ratio": ci.mean / max(sum(full_rl) / len(full_rl), 1e-12),
                      "agree": agree.mean if agree else None}
        print(f"| `{k}` | {ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}] | {summary[k]['ratio']:.2f} | "
              f"{'—' if agree is None else f'{agree.mean:.3f}'} |")
    out = {"command": search.command_line(__file__, argv), "summary": summary, "per_row": per_row}
    search.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
