"""Entry point: `python -m offramp.services.segment_worker`."""

import sys

from offramp.service import main
from offramp.services.segment_worker.service import PREFIX, SETTINGS, run

if __name__ == "__main__":
    sys.exit(main(SETTINGS, PREFIX, run))
