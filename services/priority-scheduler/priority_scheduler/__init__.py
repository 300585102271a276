"""priority-scheduler: the control plane of placement (sources, nodes, the plan)."""
