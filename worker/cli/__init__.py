"""The command line (``neiromatrius-worker``) and its tools: publish, samples, checks, the demo
and the replica harness the demo, the tests and the benchmark share.
"""
