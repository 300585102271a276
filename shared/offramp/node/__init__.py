"""What makes a process a service: its entry point, its runtime (bus, will, heartbeats), health,
metrics, logging, the peer and source tables, and its CPU and memory manners."""
