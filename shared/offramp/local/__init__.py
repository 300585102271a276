"""Running offramp on one machine: a private broker, service processes, the whole system, the
container testbed, load generation and the client side used by the demo and the benchmarks."""
