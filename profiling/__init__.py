"""NVTX ranges and throughput benchmarks; imported as adarec.profiling."""
