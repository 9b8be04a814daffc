"""Neiromatrius message worker: each chat message processed once across replicas, classified once."""

from __future__ import annotations

__version__ = "0.1.0"
