"""The product's benchmarks (`python bench/NAME.py`, from the repository root) and, in research/,
the experiments behind the README's method choices (`python -m bench.research.NAME`)."""
