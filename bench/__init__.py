"""Benchmarks: the ``ferryman bench`` CLI (``bench.cli``) comparing Ferryman with the direct path,
OpenSSH, stunnel and haproxy, its backend process (``bench.backend``), and pytest-benchmark
micro-benchmarks of the wire codec (``bench/test_*.py``).
"""
