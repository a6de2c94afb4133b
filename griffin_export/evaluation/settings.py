"""What an evaluation is asked to do: the method names it takes (`full`, selection methods,
`bundle:PATH`, `pruned-prefill:PATH`, and class experts chosen per prompt: `routed:ROUTER`,
`guarded:ROUTER`, `oracle:ROUTER`, `labeled:DIR`), its settings, and the parsing of the CLI's comma
lists and row ranges. Read by the runner, the report and the CLI."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from ..errors import GriffinError
from ..registry import METHODS
from ..settings import CHUNK_SIZE, WARMUP, check_density

FULL = "full"
BUNDLE_PREFIX = "bundle:"
# a bundle's experts for the prompt's prefill as well (generate --pruned-prefill)
PRUNED_PREFILL_PREFIX = "pruned-prefill:"


# Class experts chosen per prompt, each prefilled and decoded through them (what a deployment computes):
# the class a router picks (routed), the same with its guard sending a prompt that fits no class to the full
# model (guarded), the router's class whose experts give the prompt's gold text the highest likelihood
# (oracle), and the class the row's label names, a bundle per label in a folder (labeled).
CLASS_CHOICES = ("routed:", "guarded:", "oracle:", "labeled:")


def known_methods() -> list[str]:
    """Every name `--methods` accepts: `full`, the selection methods of registry.METHODS
    (new ones join there), fixed experts from a bundle file, and class experts chosen per prompt."""
    return [FULL, *METHODS, f"{BUNDLE_PREFIX}PATH", f"{PRUNED_PREFILL_PREFIX}PATH",
            *(f"{c}{'DIR' if c == 'labeled:' else 'ROUTER'}" for c in CLASS_CHOICES)]


def class_choice(method: str) -> tuple[str, str] | None:
    """('routed' | 'guarded' | 'oracle' | 'labeled', the path) of a class-choosing method, else None."""
    for prefix in CLASS_CHOICES:
        if method.startswith(prefix):
            return prefix[:-1], method[len(prefix):]
    return None


def bundle_path(method: str) -> str | None:
    """The bundle file a `bundle:PATH` or `pruned-prefill:PATH` method names, else None."""
    for prefix in (BUNDLE_PREFIX, PRUNED_PREFILL_PREFIX):
        if method.startswith(prefix):
            return method[len(prefix):]
    return None


# A bench or eval row's config name: the benchmark writes it, the eval report reads it back.
def config_name(method: str, density: float) -> str:
    """A bench row's config: the density alone for `topk` (the paper's method), else METHOD@DENSITY."""
    return f"{density:g}" if method == "topk" else f"{method}@{density:g}"


def parse_config(config: str) -> tuple[str, float]:
    """(method, density) of a config name; ValueError for one that names no density."""
    method, _, density = config.rpartition("@")
    return method or "topk", 1.0 if config == "full" else float(density)


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
    chunk_size: int = CHUNK_SIZE
    generate: bool = True  # False: gold log-likelihood only (no decoding, no ROUGE), for cheap searches
    # as export's warm-up, for every selection method (their keys get "+wN"); fixed experts from a bundle and
    # the full model have none (a bundle's own warm-up belongs to its own prompt)
    warmup: int = WARMUP
    label_field: str = "kind"  # labeled:DIR reads each row's class from this field

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
            choice = class_choice(m)
            if choice is not None and not (Path(choice[1]).is_dir() if choice[0] == "labeled" else
                                           Path(choice[1]).is_file()):
                raise GriffinError(f"{choice[0]}: {choice[1]} does not exist (a "
                                   f"{'folder of class bundles' if choice[0] == 'labeled' else 'router'})")
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


def check_method_name(name: str) -> str:
    if name == FULL or name in METHODS:
        return name
    if bundle_path(name) or class_choice(name):
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
    """'0.5,0.25' -> [0.5, 0.25]; the range is EvalSettings' and BenchSettings' to check."""
    out = []
    for item in parse_list(text, "densities"):
        try:
            out.append(float(item))
        except ValueError:
            raise GriffinError(f"density {item!r} is not a number") from None
    return out


# The inverses, for the CLI to show the settings' defaults as a user types them.
def rows_text(rows: tuple[int, int]) -> str:
    return f"{rows[0]}:{rows[1]}"


def list_text(items) -> str:
    """[0.25, 0.5] -> '0.25,0.5'; ['full', 'topk'] -> 'full,topk'."""
    return ",".join(f"{i:g}" if isinstance(i, float) else str(i) for i in items)


def escape(text: str) -> str:
    r"""newline -> '\n': what `unescape` reads back."""
    return text.encode("unicode_escape").decode("ascii")


def unescape(text: str) -> str:
    r"""CLI separators arrive as typed: '\n' -> newline (other text kept as it is)."""
    try:
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as e:
        raise GriffinError(f"bad escape in separator {text!r}: {e.reason}") from None
