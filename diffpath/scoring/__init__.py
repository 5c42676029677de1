"""Density scorers and metrics."""
