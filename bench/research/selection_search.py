"""Issue 8 search: gold-summary likelihood of candidate selections on dev rows, one prefill per prompt.

    python -m bench.research.selection_search --rows 5:15 --density 0.5 --json reports/selection_search/rows_5_15.json
    python -m bench.research.selection_search --rows 0:5 --density 0.25 --sensitivity --json reports/selection_search/sensitivity.json

Every variant keeps the same total number of FF neurons (30 layers x k), refits the kept
down-projection columns like `topk_refit` unless its name says otherwise, and is scored by the
mean log-likelihood per token of the gold summary, teacher-forced from the full-model prompt KV
(the evaluation runner's own functions). Variants, and why each was worth measuring:

  topk, topk_refit, topk_refit_edges   the shipped methods (export.choose_experts)
  lambda:X         edges with the refit's ridge strength X (the shipped 1 was chosen from 0.01-1)
  budget:LAYERS    full width for LAYERS ("0+28+29"), the rest spread evenly
  budget:late      layers 0, 28, 29 full, layers 1-14 at 0.3, the rest spread over 15-27
  budget:sens      allocation from a per-layer sensitivity profile (--sensitivity-file):
                   each layer's refit-error curve scaled by its measured one-layer loss
  greedy           edges budgets, neurons picked greedily to maximize the refit's explained FF
                   output energy on the prompt (target-aware pivoted Cholesky; ~20 s per prompt)
  target_only      edges, statistic and Gram from the target article's tokens only (after the last
                   '###'), not the one-shot example's
  bias             edges + a per-layer output bias fitted with the refit (FLAP-style)
  linear           edges + a full [hidden, hidden] linear map of the FF input fitted with the refit
                   (NOT within the issue's budget: 331k extra weights per layer; an upper bound)
  class_gram       edges, refit on the prompt's Gram mixed 1:1 with a class Gram (rows 20-39)
  glass            edges, ranking = rank(prompt statistic) + 0.5 rank(class statistic, rows 20-59)
  wina             edges, statistic x ||W_down column||
  taylor           edges, score = sqrt(sum_t (z dNLL/dz)^2) from one backward pass over the prompt
  taylor_mix       edges, rank(taylor) + rank(statistic)
  warmup           edges, statistic and Gram also over 16 full-model greedy tokens (weight 4 in the
                   Gram; the statistic normalizes each token, so weight 1 there)
  warm_only:N      edges, statistic and Gram over the first N full-model greedy tokens alone: the
                   deployable stand-in for oracle_gold (the model's own summary instead of the gold)
  warm_mix:N:R     edges, statistic and Gram over the prompt and the N warm-up tokens repeated R
                   times (weight R on the model's own continuation in both)
  sequential       edges, the refit fitted layer by layer inside one pruned forward over the prompt,
                   each layer on the inputs the earlier pruned layers give it, to the full model's
                   FF output (error feedback, as in sequential post-training pruning)
  stream           the same, fitted to what restores the full model's residual stream after the layer
  oracle           edges, statistic and Gram over prompt + gold tokens (NOT deployable: the gold
                   text is what is scored; an upper bound for fitting on generation-like tokens)
  oracle_gold      edges, statistic and Gram over the gold tokens alone (same caveat)

--sensitivity instead prunes one layer at a time (topk + refit at --density, other layers full)
and prints the loss per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from griffin_export.model.arch import ff_blocks, ff_param
from griffin_export.method.budget import allocate, edge_budgets, refit_error_curve
from griffin_export.evaluation.runner import Context, continuation_ids, continuation_logprobs, fresh_cache, pruned
from griffin_export.evaluation.settings import EvalSettings
from griffin_export.method.export import choose_experts, expert_weights
from griffin_export.model.tokens import tokenize
from griffin_export.model.load import load_model
from griffin_export.model.prefill import cache_tensors, forward, prefill
from griffin_export.method.selection import k_for, select_all

SEPARATOR = "\n"  # between prompt and gold summary, as in the one-shot example (the eval default)
CLASS_ROWS = {"gram": range(20, 40), "stat": range(20, 60)}  # dev rows behind class_gram and glass


@dataclass
class Prompt:
    """What one full-model prefill of a dev row gives every variant."""
    ids: torch.Tensor  # [1, T]
    cont: object  # runner.Continuation of the gold summary
    kv: list
    last: torch.Tensor  # last-position logits
    z: list[torch.Tensor]  # per layer, raw FF activations [T, D_ff]
    x: list[torch.Tensor]  # per layer, FF input [T, hidden]
    n_example: int  # tokens up to the last '###' (the one-shot example)
    lazy: dict = field(default_factory=dict)  # gold / warm-up / taylor extras, computed on first use


def statistic(z: list[torch.Tensor]) -> torch.Tensor:
    """The GRIFFIN scores [L, D_ff] of activations z (statistic.py, from whole tensors)."""
    return torch.stack([(a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)).square().sum(0).sqrt() for a in z])


def grams(z: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([a.T @ a for a in z])


def rank01(s: torch.Tensor) -> torch.Tensor:
    """Per-layer ranks scaled to [0, 1] (rank aggregation, GLASS-style)."""
    return s.argsort(1).argsort(1).float() / (s.shape[1] - 1)


class Search:
    def __init__(self, args):
        self.lm = load_model(args.model)
        self.ctx = Context(self.lm, EvalSettings(data=args.data))
        self.blocks = ff_blocks(self.lm.model, self.lm.spec)
        self.w_down = [b.output.weight.detach().float() for b in self.blocks]
        self.L, self.D = len(self.blocks), self.lm.d_ff
        self.k = k_for(args.density, self.D)
        self.density = args.density
        self.data = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()]
        self.sens = (torch.tensor(json.loads(Path(args.sensitivity_file).read_text())["mean"])
                     if args.sensitivity_file else None)
        self._class: dict[str, torch.Tensor] = {}

    # -- one prefill ---------------------------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator[tuple[list, list]]:
        """Per layer, every forward's FF activations z and FF inputs x, appended while inside."""
        z: list[list] = [[] for _ in self.blocks]
        x: list[list] = [[] for _ in self.blocks]
        hooks = [b.output.register_forward_pre_hook(lambda m, a, i=i: z[i].append(a[0].float().flatten(0, -2)))
                 for i, b in enumerate(self.blocks)]
        hooks += [b.owner.register_forward_pre_hook(lambda m, a, i=i: x[i].append(a[0].float().flatten(0, -2)))
                  for i, b in enumerate(self.blocks)]
        try:
            yield z, x
        finally:
            for h in hooks:
                h.remove()

    def capture(self, ids: torch.Tensor):
        """Full-model prefill of ids, recording. Returns (z, x, cache, last logits)."""
        with self.recording() as (z, x):
            cache, last = prefill(self.lm.model, ids, chunk_size=512)
        return [torch.cat(a) for a in z], [torch.cat(a) for a in x], cache, last

    def feed(self, cache, logits: torch.Tensor, tokens: list[int] | None = None, steps: int = 0):
        """Full-model decode steps into `cache` after `logits`, recording: the given tokens, or `steps`
        greedy ones (a warm-up). Returns (z per layer [steps, D_ff], logits after the last token)."""
        with self.recording() as (z, _):
            for i in range(steps if tokens is None else len(tokens)):
                tok = int(logits.argmax()) if tokens is None else tokens[i]
                logits = forward(self.lm.model, torch.tensor([[tok]]), cache)[-1]
        return [torch.cat(a) for a in z], logits

    def prompt(self, row: int) -> Prompt:
        text = self.data[row]["article"]
        ids = tokenize(self.lm, text)
        cont = continuation_ids(self.lm.tokenizer, text, SEPARATOR, self.data[row]["summary_gt"], ids[0].tolist())
        z, x, cache, last = self.capture(ids)
        n_example = len(self.lm.tokenizer(text[: text.rfind("###")])["input_ids"])
        return Prompt(ids, cont, cache_tensors(cache), last, z, x, n_example)

    def class_tensor(self, kind: str) -> torch.Tensor:
        """Per-token mean Gram over rows 20-39 ('gram') or the pooled statistic over rows 20-59 ('stat')."""
        if kind not in self._class:
            acc, n = 0, 0
            for r in CLASS_ROWS[kind]:
                z, _, _, _ = self.capture(tokenize(self.lm, self.data[r]["article"]))
                acc = acc + (grams(z) if kind == "gram" else statistic(z).square())
                n += z[0].shape[0]
            self._class[kind] = acc / n if kind == "gram" else acc.sqrt()
        return self._class[kind]

    # -- scoring -------------------------------------------------------------------------------
    def gold_ll(self, p: Prompt, weights=None, correction=None) -> float:
        """Mean gold log-likelihood per token with these FF weights (None: the full model) and an
        optional per-layer (M [h, h] | None, bias [h] | None) added to each FF output."""
        hooks = []
        for b, (m, bias) in zip(self.blocks, correction or []):
            hooks.append(b.owner.register_forward_hook(
                lambda mod, a, o, m=m, bias=bias: o + (a[0] @ m.T if m is not None else 0) + (bias if bias is not None else 0)))
        try:
            with pruned(self.ctx, weights):
                logp = continuation_logprobs(self.lm.model, p.kv, p.ids.shape[1], p.last, p.cont.ids)
        finally:
            for h in hooks:
                h.remove()
        return float(logp[p.cont.scored_from:].mean())

    # -- the variants --------------------------------------------------------------------------
    def edges(self) -> list[int]:
        return edge_budgets(self.L, self.D, self.k)

    def spread(self, full: list[int], fixed: dict[int, float] | None = None) -> list[int]:
        ks: list[int | None] = [None] * self.L
        for layer in full:
            ks[layer % self.L] = self.D
        for layer, f in (fixed or {}).items():
            ks[layer] = round(f * self.D)
        free = [i for i in range(self.L) if ks[i] is None]
        base, extra = divmod(self.L * self.k - sum(x for x in ks if x is not None), len(free))
        for j, i in enumerate(free):
            ks[i] = base + (1 if j < extra else 0)
        return ks

    def sens_budgets(self, gram: torch.Tensor, scores: torch.Tensor) -> list[int]:
        if self.sens is None:
            raise SystemExit("budget:sens needs --sensitivity-file (made with --sensitivity)")
        orders = torch.argsort(scores, dim=1, descending=True, stable=True)
        k0 = round(0.25 * self.D)  # the sensitivity profile's density
        curves = []
        for i in range(self.L):
            c = refit_error_curve(self.w_down[i], gram[i], orders[i], 1.0)
            curves.append(c / c[k0].clamp_min(1e-12) * float((-self.sens[i]).clamp_min(0.005)))
        return allocate(curves, self.L * self.k, min_k=min(self.k, round(0.125 * self.D)))

    def refit(self, scores, ks, gram):
        return expert_weights(self.lm, select_all(scores, ks, "topk", 0), gram=gram)

    def fit_with(self, p: Prompt, gram: torch.Tensor, scores: torch.Tensor, extra: str):
        """Edges + the refit solved jointly with an extra regressor: 'bias' (a constant) or
        'linear' (the FF input x). Returns (weights, corrections)."""
        idx = select_all(scores, self.edges(), "topk", 0)
        weights = expert_weights(self.lm, idx)
        corr = []
        for i, (z, kept) in enumerate(zip(p.z, idx)):
            drop = torch.ones(self.D, dtype=torch.bool)
            drop[kept] = False
            y = z[:, drop] @ self.w_down[i][:, drop].T  # what the dropped neurons wrote [T, h]
            extra_x = torch.ones(z.shape[0], 1) if extra == "bias" else p.x[i]
            feats = torch.cat([z[:, kept], extra_x], 1)
            g = feats.T @ feats
            nk = kept.numel()
            for sl in (slice(0, nk), slice(nk, None)):  # the refit's ridge, per block of regressors
                g.diagonal()[sl] += float(g.diagonal()[sl].mean())
            sol = torch.linalg.solve(g, feats.T @ y)
            weights[ff_param(self.lm.spec, i, self.lm.spec.output)] = (self.w_down[i][:, kept] + sol[:nk].T).contiguous()
            corr.append((None, sol[nk:][0]) if extra == "bias" else (sol[nk:].T.contiguous(), None))
        return weights, corr

    def lazy(self, p: Prompt, key: str):
        if key not in p.lazy:
            if key == "gold":  # activations over prompt + gold, teacher-forced, full model
                z, _, _, _ = self.capture(torch.cat([p.ids, p.cont.ids[None]], 1))
                p.lazy[key] = z
            elif key == "warm":  # 16 greedy full-model tokens after the prompt
                p.lazy[key] = [a[:16] for a in self.lazy(p, "warm64")]
            elif key == "warm64":  # 64 greedy full-model tokens; shorter warm-ups are their prefixes
                p.lazy[key], _ = self.feed(fresh_cache(self.lm.model, p.kv, p.ids.shape[1]), p.last, steps=64)
            elif key == "taylor":
                p.lazy[key] = self.taylor(p.ids)
        return p.lazy[key]

    def sequential(self, p: Prompt, scores: torch.Tensor, target: str):
        """Edges + a refit fitted layer by layer INSIDE one forward of the pruned model over the prompt,
        so each layer sees the inputs that the earlier pruned layers give it (error feedback). Target
        'local': the full model's FF output at that token; 'stream': whatever makes the residual
        stream after the layer equal the full model's again (corrects the upstream drift too)."""
        idx = select_all(scores, self.edges(), "topk", 0)
        weights = expert_weights(self.lm, idx)
        layers = [self.lm.model.get_submodule(b.prefix.rstrip(".").rsplit(".", 1)[0]) for b in self.blocks]
        full_out: list[torch.Tensor] = []
        mid: list = [None] * self.L
        if target == "stream":  # the full model's residual stream after each layer
            hooks = [l.register_forward_hook(lambda m, a, o: full_out.append(
                (o[0] if isinstance(o, tuple) else o).float().flatten(0, -2))) for l in layers]
            try:
                self.lm.model(p.ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()

        def refit_here(i: int, z: torch.Tensor) -> torch.Tensor:
            z = z.float().flatten(0, -2)
            kept = idx[i]
            w = self.w_down[i]
            want = p.z[i] @ w.T if target == "local" else full_out[i] - mid[i]
            zk = z[:, kept]
            resid = want - zk @ w[:, kept].T
            g = zk.T @ zk
            g.diagonal().add_(float(g.diagonal().mean().clamp_min(1e-12)))
            new = w[:, kept] + torch.linalg.solve(g, zk.T @ resid).T
            weights[ff_param(self.lm.spec, i, self.lm.spec.output)] = new.contiguous()
            return zk @ new.T

        hooks = [l.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: mid.__setitem__(i, a[0].float().flatten(0, -2))) for i, l in enumerate(layers)]
        hooks += [b.output.register_forward_hook(lambda m, a, o, i=i: refit_here(i, a[0]).reshape(o.shape).to(o))
                  for i, b in enumerate(self.blocks)]
        try:
            self.lm.model(p.ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return weights

    def taylor(self, ids: torch.Tensor) -> torch.Tensor:
        """[L, D_ff] sqrt(sum over prompt tokens of (z * dNLL/dz)^2), one backward pass."""
        zs: list = [None] * self.L

        def keep(i, a):
            a[0].retain_grad()
            zs[i] = a[0]

        hooks = [b.output.register_forward_pre_hook(lambda m, a, i=i: keep(i, a)) for i, b in enumerate(self.blocks)]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                ids = ids.clone()
                logits = self.lm.model(ids, use_cache=False).logits[0, :-1].float()
                torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
        finally:
            for h in hooks:
                h.remove()
            self.lm.model.zero_grad(set_to_none=True)
        return torch.stack([(z.detach() * z.grad).flatten(0, -2).square().sum(0).sqrt() for z in zs]).float()

    def variant(self, name: str, p: Prompt, gram: torch.Tensor, scores: torch.Tensor):
        """(weights, corrections | None) of one named variant."""
        if name in ("topk", "topk_refit", "topk_refit_edges"):
            return choose_experts(self.lm, name, scores, self.density, 0, gram=gram)[1], None
        if name.startswith("lambda:"):  # edges, the refit's ridge strength set to the number given
            return expert_weights(self.lm, select_all(scores, self.edges(), "topk", 0), gram=gram,
                                  refit_lambda=float(name.split(":", 1)[1])), None
        if name.startswith("budget:"):
            rule = name.split(":", 1)[1]
            ks = (self.sens_budgets(gram, scores) if rule == "sens" else
                  self.spread([0, 28, 29], {i: 0.3 for i in range(1, 15)}) if rule == "late" else
                  self.spread([int(x) for x in rule.split("+")]))
            return self.refit(scores, ks, gram), None
        if name == "greedy":
            return expert_weights(self.lm, greedy_select(gram, self.w_down, self.edges()), gram=gram), None
        if name == "target_only":
            z = [a[p.n_example:] for a in p.z]
            return self.refit(statistic(z), self.edges(), grams(z)), None
        if name in ("bias", "linear"):
            return self.fit_with(p, gram, scores, name)
        if name == "class_gram":
            return self.refit(scores, self.edges(), gram / p.ids.shape[1] + self.class_tensor("gram")), None
        if name == "glass":
            return self.refit(rank01(scores) + 0.5 * rank01(self.class_tensor("stat")), self.edges(), gram), None
        if name == "wina":
            return self.refit(scores * torch.stack([w.norm(dim=0) for w in self.w_down]), self.edges(), gram), None
        if name in ("taylor", "taylor_mix"):
            t = self.lazy(p, "taylor")
            return self.refit(t if name == "taylor" else rank01(t) + rank01(scores), self.edges(), gram), None
        if name == "warmup":
            z = [torch.cat([a, 2.0 * w]) for a, w in zip(p.z, self.lazy(p, "warm"))]  # 2² = weight 4
            return self.refit(statistic(z), self.edges(), grams(z)), None
        if name.startswith(("warm_only:", "warm_mix:")):
            n, *repeat = (int(x) for x in name.split(":")[1:])
            warm = [w[:n] for w in self.lazy(p, "warm64")]
            z = warm if not repeat else [torch.cat([a, w.repeat(repeat[0], 1)]) for a, w in zip(p.z, warm)]
            return self.refit(statistic(z), self.edges(), grams(z)), None
        if name in ("sequential", "stream"):
            return self.sequential(p, scores, "local" if name == "sequential" else "stream"), None
        if name in ("oracle", "oracle_gold"):
            z = self.lazy(p, "gold")
            if name == "oracle_gold":
                z = [a[p.ids.shape[1]:] for a in z]
            return self.refit(statistic(z), self.edges(), grams(z)), None
        raise SystemExit(f"unknown variant {name!r}")


def greedy_select(gram: torch.Tensor, w_down: list[torch.Tensor], ks: list[int], lam: float = 1.0) -> list[torch.Tensor]:
    """Per layer, k neurons picked one at a time to explain most of the FF output energy after the
    ridge refit (pivoted Cholesky on G + λ'I driven by G Wᵀ): the prompt-optimal subset for the refit."""
    out = []
    for g, w, k in zip(gram, w_down, ks):
        d = g.shape[0]
        if k >= d:
            out.append(torch.arange(d))
            continue
        c = g.clone()
        c.diagonal().add_(lam * float(g.diagonal().mean()))
        b = g @ w.T  # [D, hidden]: each neuron's covariance with the full output
        chosen = torch.zeros(d, dtype=torch.bool)
        for _ in range(k):
            gain = b.square().sum(1) / c.diagonal().clamp_min(1e-20)
            gain[chosen] = -1
            j = int(gain.argmax())
            chosen[j] = True
            col = c[:, j] / c[j, j].sqrt()
            bj = b[j] / c[j, j].sqrt()
            c.sub_(torch.outer(col, col))
            b.sub_(torch.outer(col, bj))
        out.append(chosen.nonzero()[:, 0])
    return out


def command_line(script: str, argv: list[str] | None) -> str:
    return " ".join(["python", "-m", f"bench.research.{Path(script).stem}", *(sys.argv[1:] if argv is None else argv)])


def write_json(path: str | None, data: dict) -> None:
    """Write `data` to `path` (if given) through a temp file, so a stopped run leaves no half file."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def parse_rows(text: str) -> range:
    a, b = (int(x) for x in text.split(":"))
    return range(a, b)


def arguments(description: str, rows: str) -> argparse.ArgumentParser:
    """The options every dev-row search script shares (this one and warmup_generation.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "xsum_dev.jsonl"))
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=parse_rows, default=parse_rows(rows), help="dev rows (0-199), START:STOP")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write every number here")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> dict:
    p = arguments(__doc__, "5:15")
    p.add_argument("--variants", default="topk,topk_refit,topk_refit_edges,budget:0+28+29,budget:0+1+28+29,"
                   "budget:late,budget:sens,greedy,target_only,bias,linear,class_gram,glass,wina,taylor,taylor_mix,"
                   "warmup,sequential,stream,oracle,oracle_gold")
    p.add_argument("--sensitivity", action="store_true", help="measure the one-layer-pruned loss per layer instead")
    p.add_argument("--sensitivity-file", help="JSON from --sensitivity, for budget:sens")
    args = parse(p, argv)
    s = Search(args)
    names = [v for v in args.variants.split(",") if v]
    if args.sensitivity:
        names = [f"layer {i}" for i in range(s.L)]
    if "budget:sens" in names and s.sens is None:
        names.remove("budget:sens")
        print("budget:sens skipped: no --sensitivity-file", file=sys.stderr)
    per_row: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for row in args.rows:
            t0 = time.perf_counter()
            pr = s.prompt(row)
            gram, scores = grams(pr.z), statistic(pr.z)
            full = s.gold_ll(pr)
            res = {}
            for i, name in enumerate(names):
                if args.sensitivity:
                    ks = [s.D] * s.L
                    ks[i] = s.k
                    weights, corr = s.refit(scores, ks, gram), None
                else:
                    weights, corr = s.variant(name, pr, gram, scores)
                res[name] = s.gold_ll(pr, weights, corr) - full
            per_row[row] = res
            print(f"row {row} ({pr.ids.shape[1]} tokens, {time.perf_counter() - t0:.0f} s): "
                  + " ".join(f"{n}={v:+.3f}" for n, v in res.items()), flush=True)
    mean = {n: sum(r[n] for r in per_row.values()) / len(per_row) for n in names}
    print(f"\nmean Δ gold log-likelihood vs full, nats/token, rows {args.rows.start}:{args.rows.stop}, "
          f"density {args.density}\n\n| variant | Δ gold LL |\n|---|---|")
    for n in names:
        print(f"| `{n}` | {mean[n]:+.3f} |")
    out = {"command": command_line(__file__, argv), "rows": [args.rows.start, args.rows.stop],
           "density": args.density, "per_row": per_row,
           "mean": [mean[n] for n in names] if args.sensitivity else mean}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
