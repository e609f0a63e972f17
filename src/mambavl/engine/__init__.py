"""The inference engine: prefill (resuming from the prefix-state cache) and the cache itself."""
