"""Experts for a class of prompts: the class statistic (running sums, shards, merge), counting
prompts here or on Ray, and the class bundle."""
