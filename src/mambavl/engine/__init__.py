"""The inference engine: the scheduler every surface decodes through (scheduler.py), prefill jobs that resume
from the prefix-state cache (prefill.py) and the cache itself (prefix_cache.py)."""
