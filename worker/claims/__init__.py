"""Claims: the protocol that lets one replica process a message ID, its Redis and memory stores,
the fallback between them, and leases. The Lua scripts are ``scripts/*.lua``.
"""
