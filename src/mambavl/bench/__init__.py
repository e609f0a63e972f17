"""Speed and memory benchmarks of mambavl's language models and of the peers measured beside them."""
