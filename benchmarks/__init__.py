"""Benchmarks of deltalora_jax (run the scripts; nothing here is imported by the library)."""
