"""Serving replica: fetches the pinned model from the MLflow registry, verifies it, and serves it."""
