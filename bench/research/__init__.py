"""Experiments behind the README's method choices, not shipped. Run them as modules from the
repository root (`python -m bench.research.selection_search ...`) so they import each other
as modules (warmup_generation builds on selection_search)."""
