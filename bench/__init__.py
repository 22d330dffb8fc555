"""Benchmarks. Run them from the repository root as modules (``python -m bench.bench_network``):
the root is then on sys.path, so they import ``tests.peers`` and ``tests.synthetic`` as the tests do."""
