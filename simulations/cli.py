"""fedsite-simulate: run jobs with hundreds of virtual clients on Flower's simulation engine (Ray).

    fedsite-simulate                                   the embedded default job (MiniLM, WordNet, 10 clients)
    fedsite-simulate JOB.toml [--clients N] [--rounds R] [--output-dir DIR]
    fedsite-simulate compare A.toml B.toml ... [--output-dir DIR]   several jobs, one report

Each run writes metrics.jsonl, checkpoints, final/, report.md and PNG plots
to its output directory (default runs/sim-<job name>-<time>) and ends with a
table of the validation metric, ε, bytes and time per round. Errors a user
can cause end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from localio.errors import EXIT_USER_ERROR
from localio.extras import missing_extra

if TYPE_CHECKING:
    from coordinator.config import JobConfig
    from simulations.runner import SimulationResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

PROG = "fedsite-simulate"


def default_config_path() -> Path:
    """The embedded default job, from a checkout or an installed package."""
    return Path(str(resources.files("simulations") / "configs" / "default.toml"))


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, help="override [simulation] clients")
    parser.add_argument("--rounds", type=int, help="override [job] rounds")
    parser.add_argument("--output-dir", type=Path, help="default: runs/sim-<job name>-<time>")
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="Ray CPUs per virtual client; actors = CPUs / this (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per actor (default: cpus-per-client)")
    parser.add_argument("--ray-address", default="local",
                        help="'local' (default) starts a private Ray; HEAD:6379 (a cluster's head, see the README), "
                             "'auto' or ray://HOST:10001 uses a running cluster")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log Flower's and Ray's messages too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))
    parser.add_argument("config", nargs="?", type=Path, help="job file (TOML); default: the embedded default job")
    _add_run_options(parser)
    from coordinator.dashboard.options import add_arguments as add_dashboard_arguments

    add_dashboard_arguments(parser)
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} compare", description="run several jobs, write one report")
    parser.add_argument("configs", nargs="+", type=Path, help="job files (TOML)")
    _add_run_options(parser)
    return parser


def _options(args: argparse.Namespace, dashboard: object = None) -> object:
    from simulations.runner import SimulationOptions

    if args.clients is not None and args.clients < 1:
        from coordinator.config import ConfigError

        raise ConfigError(f"--clients must be >= 1, got {args.clients}")
    if args.rounds is not None and args.rounds < 1:
        from coordinator.config import ConfigError

        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    return SimulationOptions(clients=args.clients, rounds=args.rounds, cpus_per_client=args.cpus_per_client,
                             threads_per_client=args.threads, ray_address=args.ray_address,
                             progress=not args.no_progress, resume=args.resume, dashboard=dashboard)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_one(args: argparse.Namespace) -> int:
    from coordinator.config import load_job
    from simulations.runner import run_job

    if args.resume and args.output_dir is None:
        from coordinator.config import ConfigError

        raise ConfigError("--resume needs --output-dir (the run to continue)")
    path = args.config or default_config_path()
    config = load_job(path)
    output_dir = args.output_dir or Path("runs") / f"sim-{config.job.name}-{_stamp()}"
    if args.dashboard_port is None:
        result = run_job(config, output_dir, _options(args))  # type: ignore[arg-type]
    else:
        result = _run_with_dashboard(args, config, output_dir)
    print(f"report: {result.output_dir / 'report.md'}  final model: {result.output_dir / 'final'}")
    return 0


def _run_with_dashboard(args: argparse.Namespace, config: JobConfig, output_dir: Path) -> SimulationResult:
    """run_job with the live dashboard serving from before the package is built to the end of the run."""
    from coordinator.dashboard import JobInfo, JobView
    from coordinator.dashboard.options import start_dashboard
    from simulations.runner import run_job

    output_dir.mkdir(parents=True, exist_ok=True)
    view = JobView(JobInfo.from_config(config), output_dir / "metrics.jsonl", source="simulation")
    dashboard = start_dashboard(args, view, output_dir=output_dir)
    try:
        result = run_job(config, output_dir, _options(args, dashboard=view))  # type: ignore[arg-type]
        view.finish()
        return result
    except BaseException as exc:
        view.fail(str(exc) or type(exc).__name__)
        raise
    finally:
        if dashboard is not None:
            dashboard.close()


def run_compare(args: argparse.Namespace) -> int:
    from coordinator.config import ConfigError, load_job
    from simulations.report import print_table, write_report
    from simulations.runner import run_job

    configs = [load_job(p) for p in args.configs]  # every file is checked before anything runs
    names = [p.stem for p in args.configs]
    if len(set(names)) != len(names):
        raise ConfigError("compare needs job files with distinct names (the file stem names each run)")
    output_dir = args.output_dir or Path("runs") / f"compare-{_stamp()}"
    folders = []
    for name, config in zip(names, configs, strict=True):
        result = run_job(config, output_dir / name, _options(args))  # type: ignore[arg-type]
        folders.append(result.output_dir)
    report = write_report(folders, output_dir, names=names, title="fedsite simulation: " + " vs ".join(names))
    for name, folder in zip(names, folders, strict=True):
        from coordinator.metrics import MetricsLog

        print_table(MetricsLog(folder / "metrics.jsonl").read(), title=f"\n{name}")
    print(f"\nreport: {report}")
    return 0


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx", "urllib3", "datasets", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """``fedsite-simulate``; without the simulation extra, one line naming it (``--help`` too)."""
    if message := missing_extra("simulation", PROG):
        print(message, file=sys.stderr)
        return EXIT_USER_ERROR
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = bool(argv) and argv[0] == "compare"
    args = build_compare_parser().parse_args(argv[1:]) if compare else build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from localio.errors import run_cli

    return run_cli(lambda: run_compare(args) if compare else run_one(args), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
