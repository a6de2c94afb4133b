"""Quality evaluation: metrics, the resumable runner, and the report (tables + plots)."""
