"""One JSONL row as a JSON object with text fields, with errors that name the file and line.
Shared by class inputs (classes.py) and evaluation data (evaluation/data.py)."""

from __future__ import annotations

import json

from ..errors import GriffinError


def json_error_text(e: json.JSONDecodeError) -> str:
    """'invalid control character at column 25': json's own message, whose position str(e) would
    give as 'line 1 column 25 (char 24)' (always line 1 here: the file's line is in `where`).
    Some messages end in a dangling 'at' ('Invalid control character at'), others do not
    ('Extra data'), so the ' at' is dropped and added back once."""
    msg = e.msg.removesuffix(" at")
    return f"{msg[:1].lower()}{msg[1:]} at column {e.colno}"


def parse_object(line: str, where: str) -> dict:
    """`where` is "FILE:LINE"."""
    try:
        # without its line ending: an unterminated string then says so, not "invalid control character"
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise GriffinError(f"{where}: not valid JSON ({json_error_text(e)})") from None
    if not isinstance(obj, dict):
        raise GriffinError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def text_field(obj: dict, name: str, where: str, hint: str = "") -> str:
    """A non-empty string field; `hint` follows the missing-field error (e.g. which option picks it)."""
    if name not in obj:
        raise GriffinError(f"{where}: no field {name!r} (fields: {', '.join(sorted(obj)) or 'none'}){hint}")
    value = obj[name]
    if not isinstance(value, str):
        raise GriffinError(f"{where}: field {name!r} holds {type(value).__name__} {json.dumps(value)[:40]}, not a string")
    if not value.strip():
        raise GriffinError(f"{where}: field {name!r} is empty")
    return value
