"""``python -m client`` is ``fedsite-client``."""

import sys

from client.cli import main

sys.exit(main())
