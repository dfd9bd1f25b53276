"""Benchmarks that print figures and write them to files (``fedmq bench ...``)."""
