"""Entry point: ``python -m priority_scheduler`` (the image's command)."""

import sys

from offramp.node.entry import main
from priority_scheduler.service import SERVICE


def cli() -> int:
    """The console script ``offramp-<service>``."""
    return main(SERVICE)


if __name__ == "__main__":
    sys.exit(cli())
