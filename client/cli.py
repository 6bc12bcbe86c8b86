"""fedsite-client: take part in a job from an edge machine.

    fedsite-client run --coordinator HOST:PORT --data FILE.jsonl --token TOKEN [--state-dir DIR]
    fedsite-client split --data FILE --clients N --output-dir DIR [--partition iid|dirichlet] [--alpha A]

Errors a user can cause (wrong token, missing data, unknown label, coordinator
unreachable for too long) end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from localio.errors import EXIT_USER_ERROR
from localio.extras import missing_extra
from localio.openmp import passive_openmp_by_default
from localio.partition import PARTITIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
passive_openmp_by_default()  # before torch loads: several processes on few cores (localio/openmp.py)


def build_parser() -> argparse.ArgumentParser:
    """``run`` (take part in a job) and ``split`` (one data file into per-client files, to try a job on one host)."""
    parser = argparse.ArgumentParser(prog="fedsite-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="enrol with a coordinator and train until the job is done")
    run.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    run.add_argument("--data", required=True, type=Path, help="local examples (JSONL or CSV, .gz allowed)")
    run.add_argument("--token", default=os.environ.get("FEDSITE_TOKEN"),
                     help="enrolment token (or set FEDSITE_TOKEN)")
    run.add_argument("--state-dir", type=Path, default=Path(".fedsite-client"),
                     help="identity, job package and privacy ledger (default .fedsite-client)")
    run.add_argument("--ca-cert", type=Path, help="CA certificate to verify the coordinator (enables TLS)")
    run.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    run.add_argument("--key", type=Path, help="client private key (mutual TLS)")
    run.add_argument("--name", default=None, help="a name for the coordinator's logs")
    run.add_argument("--give-up-after-s", type=float, default=900.0,
                     help="exit if the coordinator stays unreachable this long (default 900)")
    run.add_argument("--base-model", default=None,
                     help="lora jobs: load the base model from this local Hugging Face folder (or 'minilm') "
                          "instead of downloading it; it must match the job's fingerprint tensor for tensor")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")

    split = sub.add_parser("split", help="split one JSONL file into per-client files")
    split.add_argument("--data", required=True, type=Path)
    split.add_argument("--clients", required=True, type=int)
    split.add_argument("--output-dir", required=True, type=Path)
    split.add_argument("--partition", choices=PARTITIONS, default="iid")
    split.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skewed)")
    split.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    from client.agent import Agent, AgentOptions
    from localio.errors import UserError

    if not args.token:
        raise UserError("an enrolment token is required (--token or FEDSITE_TOKEN)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = AgentOptions(coordinator=args.coordinator, token=args.token, data=args.data,
                           state_dir=args.state_dir, ca_cert=args.ca_cert, cert=args.cert, key=args.key,
                           give_up_after_s=args.give_up_after_s, base_model=args.base_model)
    if args.name:
        options.name = args.name
    return Agent(options).run()


def _split(args: argparse.Namespace) -> int:
    # flwr-datasets' partitioners, which the simulator uses too: a client-only install lacks them
    if message := missing_extra("simulation", "fedsite-client split", ("flwr_datasets", "datasets")):
        print(message, file=sys.stderr)
        return EXIT_USER_ERROR
    from localio.partition import split_file

    paths = split_file(args.data, args.clients, args.output_dir, partition=args.partition,
                       alpha=args.alpha, seed=args.seed)
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedsite-client``: a user error ends in one line and exit status 2 (:func:`localio.errors.run_cli`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from localio.errors import run_cli

    work = (lambda: _run(args)) if args.command == "run" else (lambda: _split(args))
    return run_cli(work, prog="fedsite-client")


if __name__ == "__main__":
    sys.exit(main())
