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

import codecs
import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..arch import FFBlock, ff_blocks, ff_param, magnitude_scores, per_layer, sliced
from ..bundle import read_bundle
from ..decoding import DecodeOptions, Generation, decode, eos_ids
from ..errors import GriffinError
from ..experts import check_bundle
from ..export import choose_experts, prompt_statistic, tokenize, warm_up
from ..prompts import check_context
from ..jsonl import parse_object, text_field
from ..models import LoadedModel, dtype_name
from ..outputs import atomic_output, check_writable
from ..prefill import cache_tensors, forward, prefill, restore_cache
from ..select import METHODS, REFIT, check_density
from .metrics import first_divergence, rouge

FULL = "full"
BUNDLE_PREFIX = "bundle:"
# a bundle's experts for the prompt's prefill as well (generate --pruned-prefill)
PRUNED_PREFILL_PREFIX = "pruned-prefill:"
RESULTS_FILE = "eval.jsonl"
FORMAT = "griffin-eval"
FORMAT_VERSION = 1
# per-setting fields left None when EvalSettings.generate is False
NOT_GENERATED = ("rouge1", "rouge2", "rougeL", "tokens", "stop_reason", "text", "agree_rougeL", "first_divergence",
                 "identical")

# Methods that rank neurons by a prompt-independent weight score instead of the prompt
# statistic; mirrors export.layer_scores, which does the same for `magnitude`.
STATIC_SCORES = {"magnitude": magnitude_scores}


def known_methods() -> list[str]:
    """Every name `--methods` accepts: `full`, the selection methods of select.METHODS
    (new ones join there), and fixed experts from a bundle file."""
    return [FULL, *METHODS, f"{BUNDLE_PREFIX}PATH", f"{PRUNED_PREFILL_PREFIX}PATH"]


def bundle_path(method: str) -> str | None:
    """The bundle file a `bundle:PATH` or `pruned-prefill:PATH` method names, else None."""
    for prefix in (BUNDLE_PREFIX, PRUNED_PREFILL_PREFIX):
        if method.startswith(prefix):
            return method[len(prefix):]
    return None


# -- settings ------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    data: str
    rows: tuple[int, int] = (0, 100)  # [start, stop) line numbers of `data`, 0-based
    methods: tuple[str, ...] = (FULL, "topk", "magnitude", "random")
    densities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    seed: int = 0  # prompt r uses seed + r (random / sampling methods)
    prompt_field: str = "article"
    target_field: str = "summary_gt"
    separator: str = "\n"  # between the prompt and the gold text, as in the one-shot example
    max_tokens: int = 64  # when a row has no `max_tokens`
    chunk_size: int = 512
    generate: bool = True  # False: gold log-likelihood only (no decoding, no ROUGE), for cheap searches
    warmup: int = 0  # export --warmup for every selection method (their keys get "+wN")

    def __post_init__(self) -> None:
        self.rows = tuple(self.rows)
        self.methods = tuple(self.methods)
        self.densities = tuple(float(d) for d in self.densities)
        start, stop = self.rows
        if not 0 <= start < stop:
            raise GriffinError(f"bad row range {start}:{stop}: need 0 <= START < STOP")
        if not self.methods:
            raise GriffinError("no methods given")
        for m in self.methods:
            check_method_name(m)
            path = bundle_path(m)
            if path is not None and not Path(path).is_file():
                raise GriffinError(f"bundle {path} does not exist")
        if not self.densities:
            raise GriffinError("no densities given")
        for d in self.densities:
            check_density(d)
        if self.max_tokens < 1:
            raise GriffinError(f"max tokens must be >= 1, got {self.max_tokens}")
        if self.chunk_size < 1:
            raise GriffinError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.warmup < 0:
            raise GriffinError(f"warm-up must be >= 0 tokens, got {self.warmup}")
        if self.warmup and any(bundle_path(m) for m in self.methods):
            raise GriffinError("--warmup applies to selection methods; a bundle's experts have their own "
                               "(export the bundle with --warmup)")


def check_method_name(name: str) -> str:
    if name == FULL or name in METHODS:
        return name
    if bundle_path(name):
        return name
    raise GriffinError(f"unknown method {name!r}; known: {', '.join(known_methods())}")


def parse_rows(text: str) -> tuple[int, int]:
    """'START:STOP' (STOP exclusive, START defaults to 0) or a single row 'N'."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            return _rows(start, start + 1, text)
        if len(parts) == 2:
            return _rows(int(parts[0]) if parts[0].strip() else 0, int(parts[1]), text)
    except ValueError:
        pass
    raise GriffinError(f"bad row range {text!r}: expected START:STOP, e.g. 0:100")


def _rows(start: int, stop: int, text: str) -> tuple[int, int]:
    if not 0 <= start < stop:
        raise GriffinError(f"bad row range {text!r}: need 0 <= START < STOP")
    return start, stop


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise GriffinError(f"no {what} given")
    if len(set(items)) != len(items):
        raise GriffinError(f"{what} {text!r} names one more than once")
    return items


def parse_densities(text: str) -> list[float]:
    out = []
    for item in parse_list(text, "densities"):
        try:
            out.append(check_density(float(item)))
        except ValueError:
            raise GriffinError(f"density {item!r} is not a number") from None
    return out


def unescape(text: str) -> str:
    r"""CLI separators arrive as typed: '\n' -> newline (other text kept as it is)."""
    try:
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as e:
        raise GriffinError(f"bad escape in separator {text!r}: {e.reason}") from None


# -- data ----------------------------------------------------------------------------------


@dataclass
class EvalRow:
    index: int  # line number in the file, 0-based
    prompt: str
    target: str
    max_tokens: int
    stop: tuple[str, ...]


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_rows(settings: EvalSettings) -> list[EvalRow]:
    """The rows START..STOP-1 of the JSONL file, validated."""
    path = Path(settings.data)
    if not path.is_file():
        raise GriffinError(f"data file {settings.data} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise GriffinError(f"data file {path} is not valid UTF-8 (byte {e.start})") from None
    start, stop = settings.rows
    if stop > len(lines):
        raise GriffinError(f"rows {start}:{stop} are out of range: {path} has {len(lines)} rows")
    return [_parse_row(path, i, lines[i], settings) for i in range(start, stop)]


def _parse_row(path: Path, i: int, line: str, s: EvalSettings) -> EvalRow:
    where = f"{path}:{i + 1}"
    obj = parse_object(line, where)
    hint = "; choose one with --prompt-field / --target-field"
    texts = [text_field(obj, name, where, hint) for name in (s.prompt_field, s.target_field)]
    max_tokens = obj.get("max_tokens", s.max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise GriffinError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise GriffinError(f"{where}: stop must be a string or a list of non-empty strings")
    return EvalRow(i, texts[0], texts[1], max_tokens, tuple(stop))


# -- methods -------------------------------------------------------------------------------


@dataclass
class Setting:
    """One column of the evaluation: a method at a density (or fixed experts)."""

    key: str  # "full", "topk@0.5", "bundle:news.safetensors"
    method: str
    density: float
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # a bundle's experts
    pruned_prefill: bool = False  # the prompt's prefill runs with the experts too


def setting_key(method: str, density: float, warmup: int = 0) -> str:
    return f"{method}@{density:g}" + (f"+w{warmup}" if warmup else "")


def make_settings(lm: LoadedModel, settings: EvalSettings) -> tuple[list[Setting], dict[str, str]]:
    """The settings to evaluate (full first, once) and, per bundle, a hash of its experts."""
    out = [Setting(FULL, FULL, 1.0)]
    hashes: dict[str, str] = {}
    for name in settings.methods:
        if name == FULL:
            continue
        if bundle_path(name) is not None:
            setting, hashes[name] = _bundle_setting(lm, name)
            out.append(setting)
        else:
            out += [Setting(setting_key(name, d, settings.warmup), name, d) for d in settings.densities]
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
        fn = STATIC_SCORES.get(method)
        if fn is None:
            return prompt_scores
        if method not in self._static:
            self._static[method] = torch.stack([fn(b, self.lm.spec, self.lm.d_ff) for b in self.blocks])
        return self._static[method]

    def tensors(self, setting: Setting, prompt_scores: torch.Tensor, seed: int,
                gram: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """Per layer, the sliced FF tensors of this setting (keyed like install_slice wants)."""
        if setting.weights is not None:
            return per_layer(self.blocks, setting.weights)
        _, weights = choose_experts(self.lm, setting.method, self.scores(setting.method, prompt_scores),
                                    setting.density, seed, gram=gram)
        return per_layer(self.blocks, weights)


def pruned(ctx: Context, tensors: list[dict[str, torch.Tensor]] | None):
    """Decode with sliced FF linears inside the block; the full-width ones come back after."""
    return contextlib.nullcontext() if tensors is None else sliced(ctx.blocks, ctx.lm.spec, tensors)


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
    opts = DecodeOptions(max_new_tokens=row.max_tokens, stop=row.stop)
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
                                                gram=any(st.method in REFIT for st in settings))
    kv = cache_tensors(cache)
    prefill_s = time.perf_counter() - t0
    # export --warmup: the full model's first tokens join the statistic; pruned generations
    # continue after them (warm_kv), the gold likelihood is still scored from the prompt
    warm, warm_kv, warm_logits = [], kv, last_logits
    if s.warmup:
        warm_cache = fresh_cache(lm.model, kv, prompt_len)
        warm, warm_logits = warm_up(lm, stat, warm_cache, last_logits, s.warmup)
        warm_kv = cache_tensors(warm_cache)
    prompt_scores = stat.scores()

    results: dict[str, dict] = {}
    full_tokens: list[int] = []
    full_text = ""
    for setting in settings:
        if on_setting is not None:
            on_setting(setting.key)
        t1 = time.perf_counter()
        tensors = None if setting.method == FULL else ctx.tensors(setting, prompt_scores, s.seed + row.index, stat.gram)
        with pruned(ctx, tensors):
            own_kv, own_last = kv, last_logits
            if setting.pruned_prefill:
                own_cache, own_last = prefill(lm.model, ids, chunk_size=s.chunk_size)
                own_kv = cache_tensors(own_cache)
            logp = continuation_logprobs(lm.model, own_kv, prompt_len, own_last, cont.ids)
            gen = None
            if s.generate and tensors is not None and warm:
                gen = generate(ctx, warm_kv, prompt_len + len(warm), warm_logits, row, warm)
            elif s.generate:
                gen = generate(ctx, own_kv, prompt_len, own_last, row)
        k = lm.d_ff if tensors is None else _mean_k(ctx, tensors)
        r = {"method": setting.method, "density": setting.density, "k": k,
             "warmup": 0 if tensors is None else s.warmup, "gold_ll": float(logp[cont.scored_from:].mean())}
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
    return {"row": row.index, "prompt_tokens": prompt_len, "warmup_tokens": len(warm),
            "target_tokens": int(cont.ids.numel() - cont.scored_from),
            "split_tokenization": cont.split, "prefill_seconds": prefill_s,
            "seconds": time.perf_counter() - t0, "results": results}


def _mean_k(ctx: Context, tensors: list[dict[str, torch.Tensor]]) -> float:
    spec = ctx.lm.spec
    ks = [t[ff_param(spec, i, spec.output)].shape[1] for i, t in enumerate(tensors)]
    return sum(ks) / len(ks)


# -- the results file (resumable) -------------------------------------------------------------


def run_header(lm: LoadedModel, settings: EvalSettings, bundle_hashes: dict[str, str]) -> dict:
    """The first line of eval.jsonl. `key` must match for a run to resume; the row range is
    not part of it (per-prompt records don't depend on it), so a run can also be extended."""
    from ..provenance import environment

    data = Path(settings.data)
    key = {
        "data_hash": file_hash(data), "methods": list(settings.methods), "densities": list(settings.densities),
        "seed": settings.seed, "prompt_field": settings.prompt_field, "target_field": settings.target_field,
        "separator": settings.separator, "max_tokens": settings.max_tokens, "chunk_size": settings.chunk_size,
        "generate": settings.generate, **({"warmup": settings.warmup} if settings.warmup else {}),
        "model_fingerprint": lm.fingerprint, "dtype": dtype_name(lm.dtype), "bundles": bundle_hashes,
    }
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
        "settings": {**asdict(settings), "data_resolved": str(data.resolve())},
        "model": {"identity": lm.identity, "fingerprint": lm.fingerprint, "architecture": lm.architecture,
                  "dtype": dtype_name(lm.dtype), "device": str(lm.device), "num_layers": lm.num_layers,
                  "d_ff": lm.d_ff, "hidden_size": lm.hidden_size},
        **environment(),
    }


def read_results(path: Path, *, repair: bool = False) -> tuple[dict, dict[int, dict]]:
    """(header, {row: record}) from an eval.jsonl. A last line cut short by an interruption
    is ignored (and cut off the file with `repair`)."""
    if not path.is_file():
        raise GriffinError(f"no evaluation results at {path}")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good_end, header, records = 0, None, {}
    for n, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # the interrupted last line (with or without its newline)
                break
            raise GriffinError(f"{path}:{n + 1}: not valid JSON; the results file is damaged") from None
        if header is None:
            if obj.get("format") != FORMAT:
                raise GriffinError(f"{path} is not a griffin-export evaluation results file")
            header = obj
        elif isinstance(obj, dict) and isinstance(obj.get("row"), int) and isinstance(obj.get("results"), dict):
            records[obj["row"]] = obj
        else:
            raise GriffinError(f"{path}:{n + 1}: not a per-prompt record; the results file is damaged")
        good_end += len(line) + 1
    if header is None:
        raise GriffinError(f"{path} has no header line; start over with --force")
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return header, records


# key fields that must agree for runs to be merged (methods, densities and bundles may differ)
_MERGE_KEY = ("data_hash", "seed", "prompt_field", "target_field", "separator", "max_tokens", "chunk_size",
              "generate", "model_fingerprint", "dtype")


def merge_results(sources: list[str | os.PathLike], out: str | os.PathLike, *, force: bool = False,
                  rows: tuple[int, int] | None = None) -> Path:
    """One OUT/eval.jsonl from several runs on the same data and model: other row ranges
    (two halves run side by side) and/or other settings on the same rows, restricted to `rows`
    [start, stop) when given. A setting two runs both hold for a row must have the same results
    there (the runs are deterministic); every row must end up with the same settings. Returns
    OUT/eval.jsonl."""
    if len(sources) < 2:
        raise GriffinError("--merge needs at least two result directories")
    runs = [(str(d), *read_results(Path(d) / RESULTS_FILE)) for d in sources]
    first_dir, first, _ = runs[0]
    for d, header, _ in runs[1:]:
        diff = [k for k in _MERGE_KEY if header["key"].get(k) != first["key"].get(k)]
        if diff:
            raise GriffinError(f"{d} and {first_dir} cannot be merged: they differ in {', '.join(diff)}")
    merged: dict[int, dict] = {}
    for d, _, records in runs:
        for row, rec in records.items():
            if rows is not None and not rows[0] <= row < rows[1]:
                continue
            into = merged.setdefault(row, {**rec, "results": {}})
            for key, res in rec["results"].items():
                old = into["results"].get(key)
                if old is not None and (old["gold_ll"], old.get("text")) != (res["gold_ll"], res.get("text")):
                    raise GriffinError(f"{d}: row {row}, {key} differs from another run's result for it")
                into["results"].setdefault(key, res)
    if not merged:
        raise GriffinError(f"the runs hold no rows in {rows[0]}:{rows[1]}" if rows else "the runs hold no rows")
    settings = {frozenset(r["results"]) for r in merged.values()}
    if len(settings) != 1:
        short = min(merged.values(), key=lambda r: len(r["results"]))
        raise GriffinError(f"row {short['row']} lacks settings other rows have; merge runs that cover the same rows")
    order = list(dict.fromkeys(k for _, h, _ in runs for k in h["key"]["methods"]))
    densities = sorted({d for _, h, _ in runs for d in h["key"]["densities"]})
    bundles = {k: v for _, h, _ in runs for k, v in h["key"]["bundles"].items()}
    rows = sorted(merged)
    header = {**first, "key": {**first["key"], "methods": order, "densities": densities, "bundles": bundles},
              "settings": {**first["settings"], "methods": order, "densities": densities,
                           "rows": [rows[0], rows[-1] + 1]},
              "merged_from": [d for d, _, _ in runs]}
    out_dir = prepare_output(out)
    path = out_dir / RESULTS_FILE
    if path.exists() and not force:
        raise GriffinError(f"{path} exists; pass --force to overwrite")
    with atomic_output(path) as tmp:
        lines = [json.dumps(header)] + [json.dumps(merged[r]) for r in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def open_results(out_dir: Path, header: dict, force: bool) -> tuple[set[int], "ResultsWriter"]:
    """Rows already finished, and a writer appending to OUT/eval.jsonl (new or resumed)."""
    path = out_dir / RESULTS_FILE
    if path.exists() and not force:
        old, records = read_results(path, repair=True)
        if old.get("key") != header["key"]:
            diff = sorted(k for k in header["key"] if old.get("key", {}).get(k) != header["key"][k])
            raise GriffinError(f"{path} holds results for other settings (differs in: {', '.join(diff)}); "
                               "pass --force to start over, or choose another -o directory")
        _rewrite_header(path, {**old, "settings": header["settings"]})  # the new row range
        return set(records), ResultsWriter(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(header) + "\n", encoding="utf-8")
    return set(), ResultsWriter(path)


def _rewrite_header(path: Path, header: dict) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[0] = json.dumps(header)
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


class ResultsWriter:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        # one write per record, flushed and synced: an interruption loses at most this line
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def prepare_output(out: str | os.PathLike) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise GriffinError(f"output {out_dir} exists and is not a directory")
    if not out_dir.parent.is_dir():
        raise GriffinError(f"output directory {out_dir.parent} does not exist")
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise GriffinError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    check_writable(out_dir)
    return out_dir


def run_eval(lm: LoadedModel, settings: EvalSettings, out: str | os.PathLike, *, force: bool = False,
             progress: bool = True, limit: int | None = None) -> Path:
    """Evaluate every row of the range (skipping rows already in OUT/eval.jsonl); returns
    that file. `limit` stops after that many newly evaluated prompts (tests, timing)."""
    rows = read_rows(settings)  # bad data fails before any model work
    out_dir = prepare_output(out)
    evals, bundle_hashes = make_settings(lm, settings)
    header = run_header(lm, settings, bundle_hashes)
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
