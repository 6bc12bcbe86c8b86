"""``python -m coordinator`` is ``fedsite-coordinator``."""

import sys

from coordinator.cli import main

sys.exit(main())
