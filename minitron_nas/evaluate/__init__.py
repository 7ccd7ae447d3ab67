"""Evaluation: held-out metrics with standard errors, lm-evaluation-harness, task converters, latency."""
