"""Decide: series completeness, routing rules and per-series anomalies."""
