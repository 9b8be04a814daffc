"""The Redis layer: the link and its state, the key layout (every key is built in ``keys``),
script loading and micro-batching. Named so as not to shadow redis-py.
"""
