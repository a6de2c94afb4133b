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
from pathlib import Path
from typing import Sequence

from ..errors import GriffinError
from ..files.jsonl import parse_object
from ..model.decoding import Generation


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
                               "the same ones (or --force to start over)")
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
               "stop_reason": gen.stop_reason, "prompt": digest(text), "run": self.run}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
