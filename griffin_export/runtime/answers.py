"""The answers file of a batched generation: one JSONL row per finished prompt, appended (and
flushed) as each one finishes, so an interrupted run keeps every answer it finished and
`--resume` generates only the rest.

    {"index": 3, "where": "questions.jsonl:4", "text": "...", "tokens": 41, "stop_reason": "eos",
     "prompt": "<digest of the prompt's text>", "run": "<digest of the bundle and decoding settings>"}

Rows are in the order prompts finish; `index` is the prompt's 0-based position in the input.
A resumed run keeps a row only for the same prompt text at that index, from the same bundle
with the same settings (the two digests), so answers of other inputs or settings never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ..bundle.format import read_metadata
from ..errors import GriffinError
from ..files.inputs import iter_prompts
from ..files.jsonl import parse_object
from ..files.outputs import check_output_path
from ..model.decoding import Generation
from ..settings import DecodeOptions, RuntimeOptions, plural
from .base import BatchStats
from .opening import open_runtime

__all__ = ["AnswersRun", "generate_file"]


def digest(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = json.dumps(part, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def finished(path: str | os.PathLike, texts: Sequence[str], run: str) -> set[int]:
    """The indices an existing answers file holds, checked against these prompts' texts and this
    run's digest. A last line cut by an interruption (no newline) is dropped from the file."""
    path = Path(path)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # the row being written when the run stopped
        path.write_bytes(data)
    done: set[int] = set()
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue
        row = parse_object(raw, where)
        index = row.get("index")
        if not isinstance(index, int) or not 0 <= index < len(texts):
            raise GriffinError(f"{where}: index {index!r} is not a prompt of these inputs (0..{len(texts) - 1}); "
                               "is it the answers file of another run?")
        if row.get("prompt") != digest(texts[index]):
            raise GriffinError(f"{where}: answers another text as prompt {index} ({row.get('where')!r}): "
                               "the answers file of other inputs")
        if row.get("run") != run:
            raise GriffinError(f"{where}: was generated with another bundle or other decoding settings; resume with "
                               "the same ones (or force=True to start over)")
        done.add(index)
    return done


class AnswerWriter:
    """Opened at the first answer, so a run refused before any (a prompt over the context, say)
    leaves an existing file as it was and creates none."""

    def __init__(self, path: str | os.PathLike, run: str, *, append: bool):
        self.path, self.run, self.mode, self.f = Path(path), run, "a" if append else "w", None

    def write(self, index: int, where: str, text: str, gen: Generation) -> None:
        if self.f is None:
            self.f = open(self.path, self.mode, encoding="utf-8")
        row = {"index": index, "where": where, "text": gen.text, "tokens": len(gen.token_ids),
               "stop_reason": gen.stop_reason, **gen.extra, "prompt": digest(text), "run": self.run}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


@dataclass
class AnswersRun:
    """What generate_file did: answers written this run, kept from before, their tokens and times."""

    path: Path
    written: int
    kept: int
    stats: BatchStats
    seconds: float


def generate_file(bundle: str | os.PathLike | None, prompts: str | os.PathLike, output: str | os.PathLike,
                  options: RuntimeOptions | None = None, decode: DecodeOptions | None = None, *,
                  field: str = "prompt", batch_size: int = 8, resume: bool = False, force: bool = False,
                  progress: bool = False, quiet: bool = True, report: Callable[[str], None] | None = None) -> AnswersRun:
    """Every prompt of a JSONL file (`field` of each line) generated with the bundle's experts,
    `batch_size` at a time, each answer appended to `output` as it finishes; with `resume`, the
    answers already in `output` (of the same prompts, bundle and settings) are kept and the rest
    generated. Every line of the input is checked before any model work."""
    options, decode = options or RuntimeOptions(), decode or DecodeOptions()
    if resume and force:
        raise GriffinError("resume=True keeps the answers in the output, force=True overwrites them: choose one")
    if options.compile:
        raise GriffinError("compile=True compiles the batch-1 lean step; batches run it uncompiled")
    items = list(iter_prompts([prompts], field))
    texts = [p.text for p in items]
    # what makes an answer: the bundle (its metadata names model, experts and settings) or the router (its
    # classes' digests), and how it decodes
    meta, _ = read_metadata(options.router if bundle is None and options.router else bundle)
    run = digest(meta, decode.__dict__, options.pruned_prefill, options.runtime, *([options.guard] if options.router else []))
    out = Path(output)
    done = finished(out, texts, run) if resume and out.exists() else set()
    if not resume:
        check_output_path(out, force)
    todo = [i for i in range(len(items)) if i not in done]
    if report is not None:
        report(f"{plural(len(items), 'prompt')}, {len(done)} answered already")
    rt = open_runtime(bundle, options, new_prompts=True, quiet=quiet)
    writer = AnswerWriter(out, run, append=resume)
    stats = BatchStats()
    bar = tqdm(total=len(todo), desc="generate", unit="prompt", disable=not progress)
    t0 = time.perf_counter()

    def on_done(j: int, gen: Generation) -> None:
        i = todo[j]
        writer.write(i, items[i].where, texts[i], gen)
        bar.update(1)
        bar.set_postfix_str(f"{stats.decode_tok_s(time.perf_counter() - t0):.1f} tok/s decoding")

    try:
        rt.generate_batch([texts[i] for i in todo], decode, batch_size=batch_size, on_done=on_done,
                          names=[items[i].where for i in todo], stats=stats)
    finally:
        bar.close()
        writer.close()
    return AnswersRun(out, len(todo), len(done), stats, time.perf_counter() - t0)
