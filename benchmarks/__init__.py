"""Benchmarks for vllm-kvrunahead (TTFT harness, report, GPU correctness check). Not installed with the plugin."""
