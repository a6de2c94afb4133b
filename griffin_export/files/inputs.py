"""Prompts from files: one prompt file (or stdin), and streams of many prompts from JSONL files,
folders of .txt files and text files, with errors that name the file and line. Shared by export,
class, generate --prompts and discovery; nothing here needs a model."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import GriffinError
from .jsonl import parse_object, text_field

__all__ = ["Prompt", "iter_prompts", "read_prompt", "survey_prompts"]

# Unicode's control characters (category Cc is exactly U+0000-U+001F and U+007F-U+009F) except
# tab, newline and carriage return, and U+FFFD, which decoders put where bytes made no text.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
# Above this share a "prompt" is a binary file read by mistake (3,000 NUL bytes once made a 75 s,
# 298 MB export). Real text has next to none: the bench data (XSum, man pages, code) has zero,
# and a log pasted with its colour escapes stays well under it.
BINARY_SHARE = 0.10


def check_text(text: str, name: str) -> None:
    """Refuse a prompt that is mostly control characters: UTF-8-valid, but not text."""
    bad = len(_NOT_TEXT.findall(text))
    if bad > BINARY_SHARE * len(text):
        raise GriffinError(f"prompt {name} looks binary: {round(100 * bad / len(text))}% of its characters "
                           "are control characters")


def read_prompt(source: str | os.PathLike) -> str:
    """UTF-8 prompt text from a file, or stdin for '-'."""
    if str(source) == "-":
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        path = Path(source)
        if path.is_dir():
            raise GriffinError(f"prompt file {source} is a directory; give a text file")
        if not path.is_file():
            raise GriffinError(f"prompt file {source} does not exist")
        data = path.read_bytes()
        name = str(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GriffinError(f"prompt {name} is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise GriffinError(f"prompt {name} is empty")
    check_text(text, name)
    return text


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "file.jsonl:12" or "dir/a.txt": named in errors and warnings


def iter_prompts(paths: Sequence[str | os.PathLike], field: str = "prompt", limit: int | None = None
                 ) -> Iterator[Prompt]:
    """Prompts, one at a time, from JSONL files (`field` of each line), folders of .txt files
    (one prompt per file, sorted by name) and single text files, in the order given; the
    first `limit` only (over-context ones included: they are read, then skipped)."""
    if limit is not None and limit < 1:
        raise GriffinError(f"limit must be >= 1, got {limit}")
    return itertools.islice(_all_prompts(paths, field), limit)


def _all_prompts(paths: Sequence[str | os.PathLike], field: str) -> Iterator[Prompt]:
    if not paths:
        raise GriffinError("no input: give a JSONL file, a folder of .txt files, or text files")
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _folder(path)
        elif not path.exists():
            raise GriffinError(f"input {raw} does not exist")
        elif path.suffix.lower() == ".jsonl":
            yield from _jsonl(path, field)
        else:
            yield Prompt(read_prompt(path), str(path))


def _folder(path: Path) -> Iterator[Prompt]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    if not files:
        raise GriffinError(f"folder {path} has no .txt files")
    for f in files:
        yield Prompt(read_prompt(f), str(f))


def _jsonl(path: Path, field: str) -> Iterator[Prompt]:
    found = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GriffinError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not prompts
            text = text_field(parse_object(line, where), field, where, "; choose one with `field`")
            check_text(text, where)
            found = True
            yield Prompt(text, where)
    if not found:
        raise GriffinError(f"{path} has no prompts (the file is empty)")


@dataclass(frozen=True)
class InputSet:
    prompts: int
    digest: str  # of every prompt's text in order: shards of one run must have read the same inputs


def survey_prompts(paths: Sequence[str | os.PathLike], field: str = "prompt", limit: int | None = None) -> InputSet:
    """Read every input once without a model: counts prompts for the progress bar and the shards,
    and raises on bad input (naming file and line) before any prefill is spent."""
    h = hashlib.blake2b(digest_size=12)
    n = 0
    for prompt in iter_prompts(paths, field, limit):
        data = prompt.text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
        n += 1
    return InputSet(n, h.hexdigest())
