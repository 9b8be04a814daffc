"""Classifiers: the interface and its implementations."""
