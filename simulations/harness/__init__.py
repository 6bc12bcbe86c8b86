"""What the tests and the benchmarks drive fedsite with, not part of what users import.

- :mod:`simulations.harness.local_cluster`: a coordinator and clients as real processes over loopback, started
  with the README's commands;
- :mod:`simulations.harness.inprocess`: the round engine's driver through the wire codec, in one process;
- :mod:`simulations.harness.tiny_jobs`: tiny random BERTs and job files around them, so a test of the machinery
  measures the machinery;
- :mod:`simulations.harness.fuzz_rpc`: every Coordinator RPC fed generated inputs
  (``python -m simulations.harness.fuzz_rpc``).

No product module imports them (``tests/test_layers.py``).
"""
