"""A prompt class from text nobody here wrote: functions of the Python standard library.

    python bench/stdlib_functions.py -o code.jsonl            # 300 rows from this Python's stdlib

Each row is one documented function (or method) of a stdlib module:
  prompt      its signature and docstring (dedented), ending with the docstring's last line
  body        the rest of the function: the gold continuation, after a "\\n" separator
  source      module:qualified name, and `python` the version the source came from
  max_tokens  64, stop ["\\ndef ", "\\nclass "]: for greedy generations scored against `body`
Modules are read in sorted order, at most --per-module functions from each (so 300 rows
span ~150 modules, and rows 200+ come from modules later in the alphabet than rows 0-199);
private modules, test suites, idlelib, demos and site-packages are left out. The output is deterministic for a
given Python version.

    griffin-export class code.jsonl --limit 200 --name code -o code.safetensors
    griffin-export eval --data code.jsonl --rows 200:300 --prompt-field prompt --target-field body ...
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip",
             "config-3", "venv"}


def modules(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(("config-", "test", "_")) for part in rel.parts[:-1]) \
                or rel.name.startswith(("test", "_")) and rel.name != "__init__.py":
            continue  # private modules (_aix_support) and tests
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def functions(tree: ast.Module, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef]]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")


def split_function(lines: list[str], node: ast.FunctionDef) -> tuple[str, str] | None:
    """(signature + docstring, body) of a documented function, dedented; None if unsuitable."""
    if not (node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
            and isinstance(node.body[0].value.value, str)) or len(node.body) < 2:
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    doc_end = node.body[0].end_lineno
    text = textwrap.dedent("\n".join(lines[start:node.end_lineno]))
    parts = text.split("\n")
    cut = doc_end - start
    prompt, body = "\n".join(parts[:cut]), "\n".join(parts[cut:])
    if not body.strip() or "\t" in text:
        return None
    return prompt, body


def rows(root: Path, per_module: int, min_lines: int, max_lines: int, max_chars: int) -> Iterator[dict]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    for module, path in modules(root):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError):
            continue
        lines = source.split("\n")
        taken = 0
        for qualname, node in functions(tree):
            if taken == per_module or qualname.split(".")[-1].startswith("_"):
                continue  # public functions only: their docstrings describe behaviour
            split = split_function(lines, node)
            if split is None:
                continue
            prompt, body = split
            n_body = body.count("\n") + 1
            if not min_lines <= n_body <= max_lines or len(prompt) + len(body) > max_chars:
                continue
            taken += 1
            yield {"prompt": prompt, "body": body, "source": f"{module}:{qualname}", "python": version,
                   "max_tokens": 64, "stop": ["\ndef ", "\nclass "]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, default=300, help="rows [%(default)s]")
    p.add_argument("--per-module", type=int, default=2, help="functions per module at most [%(default)s]")
    p.add_argument("--min-lines", type=int, default=3, help="body lines at least [%(default)s]")
    p.add_argument("--max-lines", type=int, default=30, help="body lines at most [%(default)s]")
    p.add_argument("--max-chars", type=int, default=3000, help="prompt + body characters at most [%(default)s]")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="[%(default)s]")
    args = p.parse_args(argv)
    out = [r for _, r in zip(range(args.limit), rows(args.stdlib, args.per_module, args.min_lines,
                                                      args.max_lines, args.max_chars))]
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    tmp.replace(args.output)
    print(f"wrote {args.output}: {len(out)} functions from {len({r['source'].split(':')[0] for r in out})} "
          f"modules of Python {out[0]['python'] if out else '?'} ({args.stdlib})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
