"""Entry point: `python -m offramp.services.exit_arbiter`."""

import sys

from offramp.service import main
from offramp.services.exit_arbiter.service import PREFIX, SETTINGS, run

if __name__ == "__main__":
    sys.exit(main(SETTINGS, PREFIX, run))
