"""Observability: counters and their names, the cluster stats view, the monitoring HTTP server
and the logging configuration.
"""
