"""Idios: a self-hosted multi-model reverse image search service."""

__version__ = "0.1.0"
