"""The answers file of a batched generation: one JSONL row per finished prompt, appended (and
flushed) as each one finishes, so an interrupted run keeps every answer it finished and
`--resume` generates only the rest.

    {"index": 3, "where": "questions.jsonl:4", "text": "...", "tokens": 41, "stop_reason": "eos"}

Rows are in the order prompts finish; `index` is the prompt's 0-based position in the input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .decoding import Generation
from .errors import GriffinError
from .jsonl import parse_object


def finished(path: str | os.PathLike, wheres: Sequence[str]) -> set[int]:
    """The indices an existing answers file holds, checked against the inputs (`wheres`: each
    prompt's "file:line"). A last line cut by an interruption (no newline) is dropped from the file."""
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
        if not isinstance(index, int) or not 0 <= index < len(wheres):
            raise GriffinError(f"{where}: index {index!r} is not a prompt of these inputs (0..{len(wheres) - 1}); "
                               "is it the answers file of another run?")
        if row.get("where") != wheres[index]:
            raise GriffinError(f"{where}: answers {row.get('where')!r} as prompt {index}, which is {wheres[index]} "
                               "here: the answers file of other inputs")
        done.add(index)
    return done


class AnswerWriter:
    """Opened at the first answer, so a run refused before any (a prompt over the context, say)
    leaves an existing file as it was and creates none."""

    def __init__(self, path: str | os.PathLike, *, append: bool):
        self.path, self.mode, self.f = Path(path), "a" if append else "w", None

    def write(self, index: int, where: str, gen: Generation) -> None:
        if self.f is None:
            self.f = open(self.path, self.mode, encoding="utf-8")
        row = {"index": index, "where": where, "text": gen.text, "tokens": len(gen.token_ids),
               "stop_reason": gen.stop_reason}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
