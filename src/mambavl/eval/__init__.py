"""Evaluation: official scorers (`metrics`), benchmark readers (`benchmarks`), the resumable runner
(`runner`, `mambavl eval`) and the lmms-eval adapter (`lmms`)."""

from mambavl.eval.base import BENCHMARKS, Benchmark, BenchmarkError, Sample, get_benchmark, register

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "Sample", "get_benchmark", "register"]
