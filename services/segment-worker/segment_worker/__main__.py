"""Entry point: ``python -m segment_worker`` (the image's command)."""

import sys

from offramp.node.entry import main
from segment_worker.service import SERVICE


def cli() -> int:
    """The console script ``offramp-<service>``."""
    return main(SERVICE)


if __name__ == "__main__":
    sys.exit(cli())
