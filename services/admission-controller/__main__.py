"""Entry point: `python -m offramp.services.admission_controller`."""

import sys

from offramp.service import main
from offramp.services.admission_controller.service import PREFIX, SETTINGS, run

if __name__ == "__main__":
    sys.exit(main(SETTINGS, PREFIX, run))
