"""Entry point: ``python -m admission_controller`` (the image's command)."""

import sys

from admission_controller.service import SERVICE
from offramp.node.entry import main


def cli() -> int:
    """The console script ``offramp-<service>``."""
    return main(SERVICE)


if __name__ == "__main__":
    sys.exit(cli())
