"""The evaluation data: JSONL rows with a prompt and a gold text (and optional per-row
max_tokens and stop strings), checked line by line."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import GriffinError
from ..files.jsonl import parse_object, text_field
from .settings import EvalSettings

# -- data ----------------------------------------------------------------------------------


@dataclass
class EvalRow:
    index: int  # line number in the file, 0-based
    prompt: str
    target: str
    max_tokens: int
    stop: tuple[str, ...]
    label: str | None = None  # the row's class (EvalSettings.label_field), where it has one


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
    hint = "; choose one with `prompt_field` / `target_field`"
    texts = [text_field(obj, name, where, hint) for name in (s.prompt_field, s.target_field)]
    max_tokens = obj.get("max_tokens", s.max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise GriffinError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise GriffinError(f"{where}: stop must be a string or a list of non-empty strings")
    label = obj.get(s.label_field)
    return EvalRow(i, texts[0], texts[1], max_tokens, tuple(stop), label if isinstance(label, str) else None)
