"""Serving the experts: an OpenAI-compatible HTTP endpoint that routes, batches and streams (docs/serving.md)."""
