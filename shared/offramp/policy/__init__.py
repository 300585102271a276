"""Pure decision rules (no I/O): exits, batching, offloading. Tested without a broker."""
