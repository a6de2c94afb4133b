"""Measuring: quality (the resumable runner, metrics, the report with its plots) and speed (speed.py: every
runtime side by side in one process)."""
