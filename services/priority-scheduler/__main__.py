"""Entry point: `python -m offramp.services.priority_scheduler`."""

import sys

from offramp.service import main
from offramp.services.priority_scheduler.service import PREFIX, SETTINGS, run

if __name__ == "__main__":
    sys.exit(main(SETTINGS, PREFIX, run))
