"""Benchmarks of gandlf-dimlift against GaNDLF baselines: data, training comparison, throughput, MedMNIST."""
