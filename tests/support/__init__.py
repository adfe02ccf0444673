"""Helpers the tests (and benchmarks) share that are not fixtures: real servers to start."""
