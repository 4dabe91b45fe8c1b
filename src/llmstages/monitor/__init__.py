"""Monitoring: metric sinks (JSONL, TensorBoard) and, later, health checks and the report."""
