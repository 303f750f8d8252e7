"""The runtime state of a conversation: KV caches (kv_cache.py), sessions, generation, sampling."""
