"""Estimators: the torch reference, the compiled backends and the public API."""
