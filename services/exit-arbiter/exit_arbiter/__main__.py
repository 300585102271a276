"""Entry point: ``python -m exit_arbiter`` (the image's command)."""

import sys

from exit_arbiter.service import SERVICE
from offramp.node.entry import main


def cli() -> int:
    """The console script ``offramp-<service>``."""
    return main(SERVICE)


if __name__ == "__main__":
    sys.exit(cli())
