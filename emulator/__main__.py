"""``python -m emulator`` is ``fedsite-emulator``."""

import sys

from emulator.cli import main

sys.exit(main())
