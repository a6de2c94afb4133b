"""Experts for a class of prompts: the class statistic (running sums, shards, merge), counting
prompts here or on Ray, and the class bundle; classes found in an unlabeled log (discover.py) and the
router that sends a new prompt to its class, with its guard (router.py)."""
