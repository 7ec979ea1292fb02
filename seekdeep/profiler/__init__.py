"""Latency / throughput profiling of a model against batch size and input length."""

from seekdeep.profiler.latency import BatchRecommendation, LatencyProfiler, Measurement, format_table

__all__ = ["BatchRecommendation", "LatencyProfiler", "Measurement", "format_table"]
