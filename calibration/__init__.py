"""Thresholds and metrics, measured through the exported bundle with the runtime (never torch)."""
