"""Shared types every layer may use: settings, errors, messages, the classification value,
redaction, concurrency helpers and the collector's tuning.
"""
