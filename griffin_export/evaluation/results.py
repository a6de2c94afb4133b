"""The results file OUT/eval.jsonl: a header (what was evaluated, on what, where) and one
record per finished prompt, appended and flushed so a run resumes where it stopped; merging
runs of the same settings; the output directory."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..errors import GriffinError
from ..files.outputs import atomic_output, check_folder
from ..model.load import LoadedModel, dtype_name
from .data import file_hash
from .settings import EvalSettings

RESULTS_FILE = "eval.jsonl"
FORMAT = "griffin-eval"
FORMAT_VERSION = 1
# per-setting fields left None when EvalSettings.generate is False
NOT_GENERATED = ("rouge1", "rouge2", "rougeL", "tokens", "stop_reason", "text", "agree_rougeL", "first_divergence",
                 "identical")


# -- the results file (resumable) -------------------------------------------------------------


def run_header(lm: LoadedModel, settings: EvalSettings, bundle_hashes: dict[str, str],
               command: str | None = None) -> dict:
    """The first line of eval.jsonl. `key` must match for a run to resume; the row range is
    not part of it (per-prompt records don't depend on it), so a run can also be extended.
    `command`: the CLI command that reproduces the run (None when run from Python)."""
    from .provenance import environment

    data = Path(settings.data)
    key = {
        "data_hash": file_hash(data), "methods": list(settings.methods), "densities": list(settings.densities),
        "seed": settings.seed, "prompt_field": settings.prompt_field, "target_field": settings.target_field,
        "separator": settings.separator, "max_tokens": settings.max_tokens, "chunk_size": settings.chunk_size,
        "generate": settings.generate, "stop_after_text": True, **({"warmup": settings.warmup} if settings.warmup else {}),
        **({"label_field": settings.label_field} if any(m.startswith("labeled:") for m in settings.methods) else {}),
        "model_fingerprint": lm.fingerprint, "dtype": dtype_name(lm.dtype), "bundles": bundle_hashes,
    }
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
        "settings": {**asdict(settings), "data_resolved": str(data.resolve())},
        "model": {"identity": lm.identity, "fingerprint": lm.fingerprint, "architecture": lm.architecture,
                  "dtype": dtype_name(lm.dtype), "device": str(lm.device), "num_layers": lm.num_layers,
                  "d_ff": lm.d_ff, "hidden_size": lm.hidden_size},
        **environment(),
        **({"command": command} if command else {}),
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
        raise GriffinError(f"{path} has no header line; start over with force=True")
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return header, records


# key fields that must agree for runs to be merged (methods, densities and bundles may differ)
_MERGE_KEY = ("data_hash", "seed", "prompt_field", "target_field", "separator", "max_tokens", "chunk_size",
              "generate", "stop_after_text", "model_fingerprint", "dtype")


def merge_results(sources: list[str | os.PathLike], out: str | os.PathLike, *, force: bool = False,
                  rows: tuple[int, int] | None = None, command: str | None = None) -> Path:
    """One OUT/eval.jsonl from several runs on the same data and model: other row ranges
    (two halves run side by side) and/or other settings on the same rows, restricted to `rows`
    [start, stop) when given. A setting two runs both hold for a row must have the same results
    there (the runs are deterministic); every row must end up with the same settings. Returns
    OUT/eval.jsonl."""
    if len(sources) < 2:
        raise GriffinError("a merge needs at least two result directories")
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
    header.pop("command", None)  # the first run's; this file's is the merge
    if command:
        header["command"] = command
    out_dir = check_folder(out, create=True)
    path = out_dir / RESULTS_FILE
    if path.exists() and not force:
        raise GriffinError(f"{path} exists; pass force=True to overwrite")
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
                               "pass force=True to start over, or choose another output directory")
        # the new row range, and the command that asked for it (none from Python: the old one named other rows)
        old = {k: v for k, v in old.items() if k != "command"}
        _rewrite_header(path, {**old, **{k: header[k] for k in ("settings", "command") if k in header}})
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
