"""fedsite-coordinator: serve a job over gRPC until its rounds are done.

    fedsite-coordinator serve --config JOB.toml [--address HOST:PORT] [--output-dir DIR] [--resume]

Errors a user can cause end in one line on stderr and exit status 2; the
output directory keeps every completed round (restart with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from localio.errors import EXIT_USER_ERROR
from localio.extras import missing_extra
from localio.openmp import passive_openmp_by_default

if TYPE_CHECKING:
    from coordinator.rounds import GlobalModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
passive_openmp_by_default()  # before torch loads: several processes on few cores (localio/openmp.py)

DEFAULT_ADDRESS = "0.0.0.0:50051"


def build_parser() -> argparse.ArgumentParser:
    """``serve`` and ``certs``; the dashboard's flags come from its own module, which the simulator shares."""
    parser = argparse.ArgumentParser(prog="fedsite-coordinator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a job: serve clients until the last round is done")
    serve.add_argument("--config", required=True, type=Path, help="the job file (TOML)")
    serve.add_argument("--address", default=DEFAULT_ADDRESS, help=f"listen address (default {DEFAULT_ADDRESS})")
    serve.add_argument("--output-dir", type=Path, help="default: runs/<job name>")
    serve.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its last checkpoint (a finished run: export "
                            "final/ again)")
    serve.add_argument("--allow-job-change", action="store_true",
                       help="with --resume: accept a job file whose training settings (train, server, privacy, "
                            "seed) differ from the run's; the model's shape can never change")
    serve.add_argument("--linger-s", type=float, default=5.0, help="keep answering 'done' this long after the job ends")
    serve.add_argument("--insecure", action="store_true",
                       help="accepted for clarity: plaintext is what an empty [tls] table gives anyway")
    serve.add_argument("--max-calls-per-s", type=float, default=20.0,
                       help="per enrolled client, bursts of 10x allowed; more is refused with RESOURCE_EXHAUSTED "
                            "(clients back off). 0 = no limit (default 20)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on this port (off by default)")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    from coordinator.dashboard.options import add_arguments as add_dashboard_arguments

    add_dashboard_arguments(serve)
    from coordinator import certs

    certs.build_parser(sub.add_parser("certs", help="write a development CA and TLS certificates"))
    return parser


def setup_logging(output_dir: Path | None) -> None:
    """Log to stderr and, when there is a run folder, to ``coordinator.log`` in it, so a run keeps its own history."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "coordinator.log"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def serve(args: argparse.Namespace) -> int:
    """Run one job to the end: start the gRPC server before the job is prepared (clients may enrol while
    an offsite job distils its emulator), run every round, export, then keep answering "done" a moment.
    """
    from coordinator.config import load_job
    from coordinator.dashboard import JobInfo, JobView
    from coordinator.dashboard.options import start_dashboard
    from coordinator.dashboard.server import DashboardTLS
    from coordinator.job import check_output_dir, check_resumed_job, prepare_job
    from coordinator.mailbox import Mailbox
    from coordinator.ratelimit import RateLimiter
    from coordinator.registry import ClientRegistry, read_tokens
    from coordinator.server import TLSFiles, start_server
    from coordinator.servicer import CoordinatorServicer, PackageBlob
    from localio.errors import UserError

    config = load_job(args.config)
    output_dir: Path = args.output_dir or Path("runs") / config.job.name
    setup_logging(output_dir)
    log = logging.getLogger("fedsite.coordinator")
    tokens = read_tokens(config.resolve(config.enrollment.tokens_file))
    check_output_dir(output_dir, resume=args.resume)  # fail before listening
    if args.resume:
        check_resumed_job(config, output_dir, allow_changes=args.allow_job_change)
    # a client heard from within the heartbeat timeout keeps its token: a second client with it is refused
    registry = ClientRegistry.from_tokens(tokens, output_dir / "clients.json",
                                          takeover_after_s=config.job.heartbeat_timeout_s)
    mailbox = Mailbox(registry, heartbeat_timeout_s=config.job.heartbeat_timeout_s)
    # listen before the package exists (an offsite job distils for minutes): clients enrol and wait
    # instead of timing out, and the health service says NOT_SERVING until the package is ready
    if args.max_calls_per_s < 0:
        raise UserError("--max-calls-per-s must be >= 0")
    servicer = CoordinatorServicer(
        job_name=config.job.name, registry=registry, mailbox=mailbox, package=None,
        calls_per_client=RateLimiter(args.max_calls_per_s, 10 * args.max_calls_per_s)
        if args.max_calls_per_s > 0 else None,
        # wrong tokens: 20 at once, then one a second, per caller address
        failed_enrolments_per_address=RateLimiter(1.0, 20.0),
    )
    tls = None
    if config.tls.cert:
        tls = TLSFiles(cert=config.resolve(config.tls.cert), key=config.resolve(config.tls.key),
                       client_ca=config.resolve(config.tls.client_ca) if config.tls.client_ca else None)
    server = start_server(servicer, args.address, tls=tls)
    host = args.address.rsplit(":", 1)[0]
    (output_dir / "address").write_text(f"{host}:{server.port}\n")
    log.info("listening on %s:%d; preparing job %r (%s mode) in %s", host, server.port, config.job.name,
             config.job.mode, output_dir)
    metrics = None
    # the dashboard reads what the job keeps (metrics.jsonl, the registry, the engine's activity); never blocks it
    view = JobView(JobInfo.from_config(config), output_dir / "metrics.jsonl", registry=registry)
    dashboard = None

    def report(text: str) -> None:
        servicer.set_preparing(text)
        view.set_preparing(text)

    try:
        dashboard = start_dashboard(args, view, tls=DashboardTLS(tls.cert, tls.key) if tls else None,
                                    output_dir=output_dir)
        if args.metrics_port is not None:
            from coordinator.prometheus import CoordinatorMetrics

            metrics = CoordinatorMetrics(config.job.name, registry=registry, servicer=servicer,
                                         heartbeat_timeout_s=config.job.heartbeat_timeout_s, mode=config.job.mode)
            port = metrics.serve(args.metrics_port, args.metrics_host)
            log.info("Prometheus metrics on http://%s:%d/metrics", args.metrics_host, port)
        job = prepare_job(config, output_dir, resume=args.resume, report=report,
                          allow_job_change=args.allow_job_change)
        view.attach(job.engine)
        servicer.set_package(PackageBlob(job.package.blob, job.package.sha256),
                             slim=PackageBlob(job.package.slim, job.package.slim_sha256) if job.package.slim else None)
        if metrics is not None:
            job.engine.round_hooks.append(metrics.round_hook)
        log.info("job package ready (%.1f MB); %d rounds to go", len(job.package.blob) / 1e6,
                 config.job.rounds - job.engine.completed_rounds)
        server.set_serving(True)
        job.engine.run(mailbox)
        export(job.model, output_dir, job.engine.completed_rounds)
        view.finish()
        log.info("job complete: final model in %s", output_dir / "final")
        mailbox.close("job complete")
        time.sleep(args.linger_s)
    except BaseException as exc:
        view.fail(str(exc) or type(exc).__name__)
        raise
    finally:
        mailbox.close("coordinator stopped")
        server.stop()
        if metrics is not None:
            metrics.close()
        if dashboard is not None:
            dashboard.close()
    return 0


def export(model: GlobalModel, output_dir: Path, completed_rounds: int) -> None:
    """Write final/; a failure (a full disk) ends in one line saying that the checkpoints are intact and how to
    export again, and leaves no partial folder."""
    import shutil

    from safetensors import SafetensorError

    from emulator.lora import MergeError
    from localio.errors import UserError

    final = output_dir / "final"
    try:
        model.export(final)
    except (OSError, SafetensorError, MergeError) as exc:
        logging.getLogger("fedsite.coordinator").debug("export failed", exc_info=True)
        shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"exporting {final} failed ({reason[:300]}); the checkpoint of round {completed_rounds} is intact: fix "
            "the cause (free disk space?) and run the same command with --resume to export again") from exc


def main(argv: list[str] | None = None) -> int:
    """``fedsite-coordinator``: a user error ends in one line and exit status 2 (:func:`localio.errors.run_cli`).

    A client-only install (``pip install fedsite``) gets one line naming the extra to install, before any
    argument is parsed (``--help`` too) and before the server's imports could fail deep inside.
    """
    if message := missing_extra("coordinator", "fedsite-coordinator"):
        print(message, file=sys.stderr)
        return EXIT_USER_ERROR
    args = build_parser().parse_args(argv)
    from localio.errors import run_cli

    if args.command == "certs":
        from coordinator import certs

        return run_cli(lambda: certs.run(args), prog="fedsite-coordinator")
    return run_cli(lambda: serve(args), prog="fedsite-coordinator")


if __name__ == "__main__":
    sys.exit(main())
