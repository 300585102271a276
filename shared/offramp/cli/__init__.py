"""The ``offramp`` command: one module per group of subcommands; ``main`` dispatches."""
