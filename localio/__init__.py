"""Local I/O that every part of fedsite shares, and nothing else.

The bottom layer: the coordinator, the client, the model code and the simulator
import it; it imports none of them (``tests/test_layers.py`` checks this). It
holds what touches a party's own disk and terminal, never the network:

- :mod:`localio.data`: reading examples (JSONL/CSV, plain or gzip) and label sets;
- :mod:`localio.partition`: splitting one file among clients (flwr-datasets' partitioners);
- :mod:`localio.atomic`: crash-safe file writes (temp file, fsync, rename);
- :mod:`localio.errors`: errors a user can fix and the CLI wrapper that prints them in one line;
- :mod:`localio.extras`: which optional part of fedsite (pyproject's extras) a command needs, in one line
  when it is missing;
- :mod:`localio.openmp`: idle OpenMP threads that sleep rather than spin, the CLIs' default (several processes
  on few cores).
"""
