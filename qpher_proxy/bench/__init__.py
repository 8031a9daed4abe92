"""Micro-benchmarks (``python -m qpher_proxy.bench.<name> --quick``)."""
