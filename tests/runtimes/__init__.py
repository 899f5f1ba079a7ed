"""The runtime suite: moeify's HF outputs run in llama.cpp and transformers 4.x
(``make test-runtimes``; docs/runtimes.md)."""
