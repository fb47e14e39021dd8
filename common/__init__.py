"""Shared pieces of fedpal: base models, adapters, privacy math, configuration."""
