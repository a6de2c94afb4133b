"""The evaluation runner: per prompt, ONE full-model prefill, then every (method, density).

For each prompt of a JSONL file:

  1. full-model prefill with the GRIFFIN statistic (export.prompt_statistic): scores [L, D_ff],
     the prompt's KV cache and its last-position logits;
  2. for every setting (method × density, plus `full` once): select the neurons, swap the
     FF linears for sliced ones (exactly what the runtime decodes with), then
       - teacher-force the gold continuation from a fresh copy of the prompt's KV
         (mean log-likelihood per token), and
       - decode greedily from another fresh copy (ROUGE vs the gold text, agreement with full);
     and put the full-width linears back.

Cost per prompt is one prefill plus one short decode per setting; the prefill is shared.
Each finished prompt is appended to `OUT/eval.jsonl` (flushed), so an interrupted run
resumes where it stopped and gives the same final numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..bundle.experts import check_bundle, installed
from ..bundle.format import read_bundle
from ..classes.router import bundle_digest, check_router, read_router, route
from ..errors import GriffinError
from ..files.outputs import check_folder
from ..method.export import choose_experts, method_scores, precheck, prompt_statistic, warm_up
from ..model.arch import FFBlock, ff_blocks, ff_param
from ..model.decoding import Generation, decode, eos_ids
from ..model.load import LoadedModel, ModelSource
from ..model.prefill import cache_tensors, forward, prefill, restore_cache
from ..model.tokens import check_context, tokenize
from ..registry import METHODS
from ..settings import DecodeOptions, plural
from .data import EvalRow, read_rows
from .metrics import first_divergence, rouge
from .results import NOT_GENERATED, open_results, run_header
from .settings import FULL, PRUNED_PREFILL_PREFIX, EvalSettings, bundle_path, class_choice

# -- methods -------------------------------------------------------------------------------


@dataclass
class Setting:
    """One column of the evaluation: a method at a density (or fixed experts)."""

    key: str  # "full", "topk@0.5", "bundle:news.safetensors"
    method: str
    density: float
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # a bundle's experts
    pruned_prefill: bool = False  # the prompt's prefill runs with the experts too
    warmup: int = 0  # full-model tokens before the experts take over (selection methods; a bundle has its own)
    # experts chosen per prompt (class_choice): (ctx, row, ids, continuation) -> (weights or None for the full
    # model, what the row records of the choice)
    choose: Callable | None = field(default=None, repr=False)


def setting_key(method: str, density: float, warmup: int = 0) -> str:
    return f"{method}@{density:g}" + (f"+w{warmup}" if warmup else "")


def make_settings(lm: LoadedModel, settings: EvalSettings) -> tuple[list[Setting], dict[str, str]]:
    """The settings to evaluate (full first, once) and, per bundle, a hash of its experts."""
    out = [Setting(FULL, FULL, 1.0)]
    hashes: dict[str, str] = {}
    loaded: dict[str, tuple] = {}  # a router's classes, read once for its routed:, guarded: and oracle: settings
    for name in settings.methods:
        if name == FULL:
            continue
        if bundle_path(name) is not None:
            setting, hashes[name] = _bundle_setting(lm, name)
            out.append(setting)
        elif class_choice(name) is not None:
            setting, hashes[name] = _class_setting(lm, name, settings, loaded)
            out.append(setting)
        else:
            out += [Setting(setting_key(name, d, settings.warmup), name, d, warmup=settings.warmup)
                    for d in settings.densities]
    return out, hashes


def _bundle_setting(lm: LoadedModel, name: str) -> tuple[Setting, str]:
    """Fixed experts from a bundle file (e.g. a class bundle): applied to every prompt
    as they are, without the prompt statistic."""
    path = bundle_path(name)
    bundle = read_bundle(path, load_kv=False)
    info = bundle.info
    check_bundle(lm, info, path)
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(bundle.weights):
        h.update(key.encode())
        h.update(bundle.weights[key].contiguous().view(torch.uint8).numpy())
    density = sum(info.k) / (info.num_layers * info.d_ff)
    weights = {k: v.to(lm.device) for k, v in bundle.weights.items()}
    return (Setting(name, name, density, weights, pruned_prefill=name.startswith(PRUNED_PREFILL_PREFIX)),
            h.hexdigest())


def _class_setting(lm: LoadedModel, name: str, settings: EvalSettings, loaded: dict[str, tuple]
                   ) -> tuple[Setting, str]:
    """Class experts chosen per prompt (evaluation/settings.CLASS_CHOICES), each prompt prefilled
    through its class's experts. The classes' weights are read once per router or folder (`loaded`)."""
    kind, path = class_choice(name)
    if path not in loaded:
        loaded[path] = _read_classes(lm, kind, path)
    router, classes, digest = loaded[path]

    def choose(ctx: Context, row: EvalRow, ids: torch.Tensor, cont: Continuation):
        if kind == "labeled":
            if row.label not in classes:
                raise GriffinError(f"row {row.index}: label {row.label!r} ({settings.label_field}) names no class "
                                   f"bundle in {path} ({', '.join(classes)})")
            return classes[row.label], {"class": row.label}
        if kind == "oracle":  # the class whose experts give the gold text the highest likelihood
            lls = {n: gold_loglik(ctx, w, ids, cont) for n, w in classes.items()}
            best = max(lls, key=lls.get)
            return classes[best], {"class": best, "class_gold_ll": lls}
        r = route(ctx.lm, router, ids)
        info = {"class": r.name, "similarity": r.similarity, "guarded": kind == "guarded" and r.guarded}
        return (None if info["guarded"] else classes[r.name]), info

    density = sum(t.shape[1] for k, t in next(iter(classes.values())).items()
                  if k.endswith(f"{lm.spec.output}.weight")) / (lm.num_layers * lm.d_ff)  # nominal, of the first class
    return Setting(name, name, density, pruned_prefill=True, choose=choose), digest


def _read_classes(lm: LoadedModel, kind: str, path: str) -> tuple:
    """(router or None, {class: weights on the device}, a digest of the class bundles) of a router, or of
    a folder of bundles named by their labels."""
    if kind == "labeled":
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise GriffinError(f"labeled:{path} holds no class bundles (.safetensors, one per label)")
        names, router = [f.stem for f in files], None
    else:
        router = read_router(path)
        check_router(router, lm)
        names, files = router.info.classes, router.bundle_paths()
    classes = {}
    for n, f in zip(names, files):
        bundle = read_bundle(f, load_kv=False)
        check_bundle(lm, bundle.info, str(f))
        classes[n] = {k: v.to(lm.device) for k, v in bundle.weights.items()}
    return router, classes, hashlib.blake2b("".join(bundle_digest(f) for f in files).encode(),
                                            digest_size=16).hexdigest()


def gold_loglik(ctx: Context, weights: dict[str, torch.Tensor], ids: torch.Tensor, cont: Continuation) -> float:
    """Mean log-likelihood of the gold text with these experts, the prompt prefilled through them."""
    with installed(ctx.lm, weights):
        cache, last = prefill(ctx.lm.model, ids, chunk_size=ctx.settings.chunk_size)
        logp = continuation_logprobs(ctx.lm.model, cache_tensors(cache), ids.shape[1], last, cont.ids)
    return float(logp[cont.scored_from:].mean())


# -- the evaluation of one prompt ------------------------------------------------------------


@dataclass
class Context:
    """What every prompt's evaluation shares: the model, its full-width FF blocks, static scores."""

    lm: LoadedModel
    settings: EvalSettings
    blocks: list[FFBlock] = field(init=False)
    eos: set[int] = field(init=False)
    _static: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Taken once from the unmodified model: these keep pointing at the full-width linears
        # while a setting's sliced ones are installed.
        self.blocks = ff_blocks(self.lm.model, self.lm.spec)
        self.eos = eos_ids(self.lm.config, self.lm.tokenizer)

    def scores(self, method: str, prompt_scores: torch.Tensor) -> torch.Tensor:
        """[L, D_ff] scores `method` ranks by: the prompt statistic, or a static weight score."""
        if METHODS[method].scores is None:
            return prompt_scores
        if method not in self._static:  # the same for every prompt: computed once
            self._static[method] = method_scores(self.lm, method, prompt_scores)
        return self._static[method]

    def tensors(self, setting: Setting, prompt_scores: torch.Tensor, seed: int,
                gram: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The sliced FF weights of this setting, keyed like a bundle's."""
        if setting.weights is not None:
            return setting.weights
        _, weights = choose_experts(self.lm, setting.method, self.scores(setting.method, prompt_scores),
                                    setting.density, seed, gram=gram, ids=ids)
        return weights


def pruned(ctx: Context, tensors: dict[str, torch.Tensor] | None):
    """Decode with the experts inside the block; the full-width FF linears come back after."""
    return contextlib.nullcontext() if tensors is None else installed(ctx.lm, tensors)


def fresh_cache(model, kv, prompt_len: int):
    return restore_cache(model, [(k.clone(), v.clone()) for k, v in kv], prompt_len)


@dataclass
class Continuation:
    ids: torch.Tensor  # [n] tokens fed after the prompt: separator then gold text
    scored_from: int  # tokens before this index (the separator) are fed but not scored
    split: bool  # True when prompt+continuation did not tokenize as prompt, then continuation


def continuation_ids(tokenizer, prompt: str, separator: str, target: str, prompt_ids: list[int]) -> Continuation:
    """Tokens of the gold continuation exactly as they follow the prompt's own tokens.

    The ids of prompt+separator+target are split after the prompt's tokens (the prompt KV
    comes from the prompt alone); the separator's tokens are fed but not scored, so the
    number is the likelihood of the gold text itself. Should a token merge across the
    boundary, the pieces are tokenized separately instead (and the row says `split`).
    """
    p = len(prompt_ids)
    joint = tokenizer(prompt + separator + target)["input_ids"]
    head = tokenizer(prompt + separator)["input_ids"]
    if joint[:p] == prompt_ids and joint[: len(head)] == head and len(joint) > len(head):
        return Continuation(torch.tensor(joint[p:]), len(head) - p, False)
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not tgt:
        raise GriffinError("the gold text encodes to 0 tokens")
    return Continuation(torch.tensor(sep + tgt), len(sep), True)


def continuation_logprobs(model, kv, prompt_len: int, last_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[i] | prompt, ids[:i]) for every i: [n].

    ids[0] is predicted by the prompt's last-position logits (those of the prefill, like the first
    generated token); ids[1:] are teacher-forced through `model` as it is now (pruned)
    from a fresh copy of the prompt's KV.
    """
    logits = [last_logits.float()[None]]  # [1, vocab]
    if ids.numel() > 1:
        cache = fresh_cache(model, kv, prompt_len)
        logits.append(forward(model, ids[None, :-1].to(last_logits.device), cache, last_only=False))
    logp = torch.log_softmax(torch.cat(logits), dim=-1)  # [n, vocab]
    return logp.gather(1, ids[:, None].to(logp.device))[:, 0].cpu()


def generate(ctx: Context, kv, cached: int, last_logits: torch.Tensor, row: EvalRow,
             warm: list[int] = ()) -> Generation:
    """Greedy decode from a copy of `kv` (`cached` positions: the prompt, then the `warm` tokens)."""
    model, device = ctx.lm.model, ctx.lm.device
    cache = fresh_cache(model, kv, cached)
    opts = DecodeOptions(max_new_tokens=row.max_tokens, stop=row.stop, stop_after_text=True)
    return decode(lambda tok: forward(model, torch.tensor([[tok]], device=device), cache)[-1], last_logits, opts,
                  tokenizer=ctx.lm.tokenizer, eos=ctx.eos, prefix=warm)


@torch.inference_mode()
def evaluate_prompt(ctx: Context, row: EvalRow, settings: list[Setting], *,
                    on_setting: Callable[[str], None] | None = None) -> dict:
    """Every setting on one prompt, sharing one full-model prefill. Returns the JSONL record.
    `on_setting(key)` is called as each setting starts (progress display)."""
    lm, s = ctx.lm, ctx.settings
    t0 = time.perf_counter()
    ids = tokenize(lm, row.prompt)  # [1, T]
    prompt_len = ids.shape[1]
    cont = continuation_ids(lm.tokenizer, row.prompt, s.separator, row.target, ids[0].tolist())
    check_context(lm.context_length, prompt_len, reserve=max(cont.ids.numel(), row.max_tokens), warmup=s.warmup)
    stat, cache, last_logits = prompt_statistic(lm, ids, chunk_size=s.chunk_size,
                                                gram=any(st.method in METHODS and METHODS[st.method].refit for st in settings))
    kv = cache_tensors(cache)
    prefill_s = time.perf_counter() - t0
    # export --warmup: the full model's first tokens join the statistic; pruned generations
    # continue after them (warm_kv), the gold likelihood is still scored from the prompt
    warm, warm_kv, warm_logits = [], kv, last_logits
    if any(st.warmup for st in settings):
        warm_cache = fresh_cache(lm.model, kv, prompt_len)
        warm, warm_logits = warm_up(lm, stat, warm_cache, last_logits, s.warmup)
        warm_kv = cache_tensors(warm_cache)
    prompt_scores = stat.scores()

    results: dict[str, dict] = {}
    full_tokens: list[int] = []
    full_text = ""
    # settings that land on the same experts the same way give the same results (greedy decoding): a guarded
    # prompt's row is the full model's, a routed class's the oracle's when they agree, computed once
    done: dict[tuple, dict] = {}
    for setting in settings:
        if on_setting is not None:
            on_setting(setting.key)
        t1 = time.perf_counter()
        chosen: dict = {}
        if setting.choose is not None:
            tensors, chosen = setting.choose(ctx, row, ids, cont)
        else:
            tensors = None if setting.method == FULL else ctx.tensors(setting, prompt_scores, s.seed + row.index,
                                                                       stat.gram, ids)
        same = (id(tensors) if tensors is not None else None, setting.pruned_prefill and tensors is not None,
                setting.warmup)
        if same in done and (tensors is not None or setting.method != FULL):
            r = {**done[same], "method": setting.method, "density": setting.density, **chosen}
            if tensors is None and s.generate:  # the full model's own row, as another setting: it agrees with itself
                r.update(agree_rougeL=rouge(full_text, full_text)["rougeL"], first_divergence=len(full_tokens),
                         identical=True)
            results[setting.key] = {**r, "seconds": time.perf_counter() - t1}
            continue
        with pruned(ctx, tensors):
            own_kv, own_last = kv, last_logits
            if setting.pruned_prefill and tensors is not None:
                own_cache, own_last = prefill(lm.model, ids, chunk_size=s.chunk_size)
                own_kv = cache_tensors(own_cache)
            logp = continuation_logprobs(lm.model, own_kv, prompt_len, own_last, cont.ids)
            gen = None
            if s.generate and setting.warmup and warm:
                gen = generate(ctx, warm_kv, prompt_len + len(warm), warm_logits, row, warm)
            elif s.generate:
                gen = generate(ctx, own_kv, prompt_len, own_last, row)
        k = lm.d_ff if tensors is None else _mean_k(ctx, tensors)
        r = {"method": setting.method, "density": setting.density, "k": k,
             "warmup": setting.warmup, "gold_ll": float(logp[cont.scored_from:].mean()), **chosen}
        if gen is None:
            r.update({name: None for name in NOT_GENERATED})
        else:
            r.update(**rouge(gen.text, row.target), tokens=len(gen.token_ids), stop_reason=gen.stop_reason,
                     text=gen.text)
        if setting.method == FULL:
            if gen is not None:
                full_tokens, full_text = gen.token_ids, gen.text
            r.update(agree_rougeL=None, first_divergence=None, identical=None)
        elif gen is not None:
            div = first_divergence(gen.token_ids, full_tokens)
            r.update(agree_rougeL=rouge(gen.text, full_text)["rougeL"], first_divergence=div,
                     identical=gen.token_ids == full_tokens)
        r["seconds"] = time.perf_counter() - t1
        results[setting.key] = r
        done[same] = {k: v for k, v in r.items() if k not in chosen}
    return {"row": row.index, "prompt_tokens": prompt_len, "warmup_tokens": len(warm),
            "target_tokens": int(cont.ids.numel() - cont.scored_from),
            "split_tokenization": cont.split, "prefill_seconds": prefill_s,
            "seconds": time.perf_counter() - t0, "results": results}


def _mean_k(ctx: Context, tensors: dict[str, torch.Tensor]) -> float:
    spec = ctx.lm.spec
    ks = [tensors[ff_param(spec, i, spec.output)].shape[1] for i in range(len(ctx.blocks))]
    return sum(ks) / len(ks)


def run_eval(lm: LoadedModel, settings: EvalSettings, out: str | os.PathLike, *, force: bool = False,
             progress: bool = True, limit: int | None = None, command: str | None = None) -> Path:
    """Evaluate every row of the range (skipping rows already in OUT/eval.jsonl); returns
    that file. `limit` stops after that many newly evaluated prompts (tests, timing);
    `command`, the CLI command that asked for this, is recorded for the report."""
    rows = read_rows(settings)  # bad data fails before any model work
    out_dir = check_folder(out, create=True)
    evals, bundle_hashes = make_settings(lm, settings)
    header = run_header(lm, settings, bundle_hashes, command)
    done, writer = open_results(out_dir, header, force)
    todo = [r for r in rows if r.index not in done]
    if limit is not None:
        todo = todo[:limit]
    ctx = Context(lm, settings)
    bar = tqdm(todo, desc=f"eval ({len(evals)} settings/prompt)", unit="prompt", disable=not progress,
               initial=0, total=len(todo))
    for row in bar:
        show = (lambda key, i=row.index: bar.set_postfix_str(f"row {i}: {key}", refresh=True)) if progress else None
        writer.append(evaluate_prompt(ctx, row, evals, on_setting=show))
    bar.close()
    return writer.path


def evaluate(settings: EvalSettings, out: str | os.PathLike, source: ModelSource | None = None, *,
             force: bool = False, progress: bool = True, command: str | None = None,
             report: Callable[[str], None] | None = None) -> Path:
    """run_eval with its model: the data, the output folder, the device, architecture and densities
    checked before the model loads."""
    source = source or ModelSource()
    read_rows(settings)
    check_folder(out)
    precheck(source, settings.densities)
    if report is not None:
        n = 1 + sum(1 if bundle_path(m) else len(settings.densities) for m in settings.methods if m != FULL)
        report(f"{plural(settings.rows[1] - settings.rows[0], 'prompt')} × {plural(n, 'setting')}"
               f": a prefill and {'a generation' if settings.generate else 'a likelihood'} per setting of each prompt; "
               "the bar's estimate of the time left is there after the first prompt")
        report(f"loading model {source.model or 'default (SmolLM2-135M-Instruct)'} ...")
    return run_eval(source.load(quiet=not progress), settings, out, force=force, progress=progress, command=command)
