"""python -m simulations: the same as fedsite-simulate."""

import sys

from simulations.cli import main

sys.exit(main())
