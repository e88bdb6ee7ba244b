"""Formats (stdlib only): testbed, profile and plan files, the model catalog, errors, paths."""
