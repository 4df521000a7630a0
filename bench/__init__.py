"""Benchmarks: each compares a part of sol with a baseline measured in the same run and
prints ratios. They need everything (engine, server, client, training), so they live
here, the one package the layer contracts let import every other one."""
