"""From a prompt to its experts: the GRIFFIN statistic, the selection methods (registry.py),
per-layer budgets, the refit, and the export of one prompt to a Bundle."""
