"""The deployment: docker-compose.yml validated by docker-compose itself, the containers' commands
(docker/entrypoint.sh certs | coordinator | client, docker/healthcheck.py) run as plain processes, and,
where a Docker engine answers, the real thing.

Without an engine the end-to-end test runs the very script the image's ENTRYPOINT runs, with the
container paths pointed at temporary folders: certificates, a coordinator serving over mutual TLS, three
clients with --ca-cert/--cert/--key, one round on the tiny model. With an engine (``bash docker/engine.sh``):
docker/build.sh refuses bad build arguments in one line; the long tests (FEDSITE_LONG_TESTS=1) build the
image air-gapped and run docker/smoke.sh (the compose stack end to end) and docker/faults.sh (the
coordinator and a client container killed mid-job and brought back).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulations.harness.local_cluster import free_port, process_env, tail, wait_all, wait_for_text
from tests.e2e.harness import disjoint_shards

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose binary not installed (apt-get install -y docker-compose)")


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    # Debian's docker-compose is a Python program of the system interpreter: keep this process's
    # Python settings (PYTHONPATH, PYTHONHOME, virtualenv; Ray sets some) away from it
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDSITE_", "TORCH_VARIANT", "PYTHON", "VIRTUAL_ENV", "RAY_"))}
    return subprocess.run([COMPOSE, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"),
                           "--env-file", str(env_file), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


@needs_compose
def test_compose_file_is_valid_and_wires_tls_volumes_ports_and_tokens(tmp_path: Path) -> None:
    env_file = tmp_path / "test.env"
    env_file.write_text((REPO / ".env.example").read_text().replace("FEDSITE_PORT=50051", "FEDSITE_PORT=6000")
                        .replace("change-me-token-2", "secret-two"))
    result = _compose(env_file, "config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"certs", "coordinator", "client-1", "client-2", "client-3"}
    assert services["certs"]["command"] == ["certs"]
    coordinator = services["coordinator"]
    assert coordinator["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert coordinator["environment"]["FEDSITE_TOKENS"] == "change-me-token-1,secret-two,change-me-token-3"
    ports = [str(p["published"]) + ":" + str(p["target"]) if isinstance(p, dict) else str(p).split("/")[0]
             for p in coordinator["ports"]]  # compose v1 prints "host:published:target/tcp", v2 a mapping
    assert any(p.endswith("6000:6000") for p in ports) and any(p.endswith("9100:9100") for p in ports)
    assert any(p.endswith("8443:8443") for p in ports)  # the dashboard, behind a token
    assert coordinator["environment"]["FEDSITE_DASHBOARD_TOKEN"] == "change-me-dashboard-token"
    assert all(p.startswith("127.0.0.1:") for p in ports if isinstance(p, str) and p.count(":") == 2)
    assert coordinator["healthcheck"]["test"][-1] == "/usr/local/bin/fedsite-healthcheck"
    assert coordinator["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim", "OFFLINE": "0", "TORCH_VARIANT": "cpu"}
    volumes_of = {name: {v.split(":")[0]: v.split(":")[1] for v in s["volumes"]} for name, s in services.items()}
    assert volumes_of["coordinator"] == {"certs": "/certs", "coordinator-data": "/data"}
    state_and_data = [tuple(sorted(set(volumes_of[f"client-{i}"]) - {"certs"})) for i in (1, 2, 3)]
    assert len(set(state_and_data)) == 3 and all(len(v) == 2 for v in state_and_data)  # nothing shared but certs
    for i, token in ((1, "change-me-token-1"), (2, "secret-two"), (3, "change-me-token-3")):
        client = services[f"client-{i}"]
        assert client["command"] == ["client"]  # the image's default command is the coordinator
        assert client["environment"]["FEDSITE_TOKEN"] == token
        assert client["environment"]["FEDSITE_COORDINATOR"] == "coordinator:6000"
        assert client["environment"]["FEDSITE_MTLS"] == "1"
        assert client["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert all(v.endswith(":ro") for v in client["volumes"] if v.startswith("certs:"))
    # a missing token is refused with a message naming it
    env_file.write_text("\n".join(line for line in env_file.read_text().splitlines()
                                  if not line.startswith("FEDSITE_TOKEN_3")))
    missing = _compose(env_file, "config")
    assert missing.returncode != 0 and "set FEDSITE_TOKEN_3 in .env" in missing.stderr


def test_dockerfile_builds_from_any_base_offline_with_cpu_torch_first_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = text.splitlines()
    # the default base stays the official Python image; the air-gapped site passes its own
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines and "FROM ${BASE_IMAGE} AS base" in lines
    for arg in ("WHEELHOUSE=docker/wheelhouse", "OFFLINE=0", "TORCH_VARIANT=cpu", "TORCH_VERSION=2.13.0",
                "CA_CERTIFICATES=docker/ca-certificates", "PIP_INDEX_URL="):
        assert f"ARG {arg}" in lines, arg
    # torch on its own layer before the requirements, and both before fedsite's code is copied
    torch_at, deps_at = text.index("pip-install.sh torch"), text.index("pip-install.sh requirements")
    code_at = text.index("COPY coordinator ./coordinator")
    assert torch_at < deps_at < code_at
    # the wheelhouse is seen only by the deps stage: the final image copies the venv, never the wheels
    final = text[text.index("\nFROM base\n"):]
    assert "wheelhouse" not in final and "COPY --from=deps /opt/venv /opt/venv" in final
    assert "--no-index" in final  # fedsite itself is installed without reaching an index
    assert "USER fedsite" in final and 'ENTRYPOINT ["fedsite-entrypoint"]' in final
    copied = {line.split()[1] for line in lines
              if line.startswith("COPY ") and "${" not in line and "--from" not in line}
    assert {"docker/entrypoint.sh", "docker/healthcheck.py", "docker/base-setup.sh", "docker/pip-install.sh"} <= copied
    for source in copied:
        assert (REPO / source).exists(), source
    # the build context leaves out local environments and runs, but not the wheelhouse or CA folders
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "runs"} <= set(ignored) and not any(i.startswith("docker") for i in ignored)
    assert (REPO / "docker" / "wheelhouse" / ".gitignore").read_text().count("*.whl") == 1


def test_build_scripts_and_entrypoint_are_strict_shell() -> None:
    for script in ("build.sh", "smoke.sh", "faults.sh", "engine.sh", "wheelhouse.sh"):
        text = (REPO / "docker" / script).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, script
        checked = subprocess.run(["bash", "-n", str(REPO / "docker" / script)], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, (script, checked.stderr)
    for script in ("base-setup.sh", "pip-install.sh", "entrypoint.sh"):  # run by /bin/sh inside the image
        checked = subprocess.run(["sh", "-n", str(REPO / "docker" / script)], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, (script, checked.stderr)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = process_env(threads=1)
    env.update({"FEDSITE_PYTHON": sys.executable, "FEDSITE_CERTS_DIR": str(tmp_path / "certs"),
                "FEDSITE_EXAMPLES": str(REPO / "coordinator" / "examples"), **extra})
    return env


def _entry(role: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(["sh", str(ENTRYPOINT), role, *extra], stdout=handle, stderr=subprocess.STDOUT, env=env,
                            cwd=str(REPO))


def test_entrypoint_refuses_clearly_without_certs_or_token(tmp_path: Path) -> None:
    env = _env(tmp_path, FEDSITE_TOKENS="a")
    done = subprocess.run(["sh", str(ENTRYPOINT), "coordinator"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "run the certs service first" in done.stderr
    assert subprocess.run(["sh", str(ENTRYPOINT), "certs"], env=env, capture_output=True, check=False).returncode == 0
    env.pop("FEDSITE_TOKEN", None)
    done = subprocess.run(["sh", str(ENTRYPOINT), "client"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "FEDSITE_TOKEN is empty" in done.stderr
    open_dashboard = {**env, "FEDSITE_DATA_DIR": str(tmp_path / "data"), "FEDSITE_DASHBOARD_PORT": "8443"}
    done = subprocess.run(["sh", str(ENTRYPOINT), "coordinator"], env=open_dashboard, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and "FEDSITE_DASHBOARD_TOKEN is empty" in done.stderr


@pytest.mark.slow
def test_the_container_commands_run_a_mutual_tls_round(tiny_bert_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    tokens = ["tok-one", "tok-two", "tok-three"]
    base = _env(tmp_path, FEDSITE_PORT=str(port), FEDSITE_MTLS="1")
    certs = subprocess.run(["sh", str(ENTRYPOINT), "certs"], env={**base, "FEDSITE_CERT_HOSTS": "fedsite.test"},
                           capture_output=True, text=True, check=False)
    assert certs.returncode == 0, certs.stderr
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.pem", "client-key.pem", "client.pem", "server-key.pem", "server.pem"]

    coord_env = {**base, "FEDSITE_DATA_DIR": str(tmp_path / "coordinator"), "FEDSITE_TOKENS": ",".join(tokens),
                 "FEDSITE_MODEL": str(tiny_bert_dir), "FEDSITE_ROUNDS": "1", "FEDSITE_CLIENTS_PER_ROUND": "3",
                 "FEDSITE_MIN_CLIENTS": "3", "FEDSITE_LOCAL_STEPS": "2", "FEDSITE_BATCH_SIZE": "4",
                 "FEDSITE_MAX_LENGTH": "32", "FEDSITE_VALIDATION_MAX": "100", "FEDSITE_ADDRESS": f"127.0.0.1:{port}",
                 "FEDSITE_METRICS_PORT": str(free_port()), "FEDSITE_DASHBOARD_PORT": str(free_port()),
                 "FEDSITE_DASHBOARD_TOKEN": "dash-token"}
    coordinator = _entry("coordinator", coord_env, tmp_path / "coordinator.log", "--linger-s", "2")
    run_dir = tmp_path / "coordinator" / "run"
    assert wait_for_text(run_dir / "address", str(port), timeout_s=300), tail(tmp_path / "coordinator.log")
    _check_dashboard(run_dir, tmp_path / "certs" / "ca.pem", coord_env["FEDSITE_DASHBOARD_PORT"], "dash-token")
    # as Docker does: run the healthcheck until it passes (NOT_SERVING while the job package is built)
    deadline = time.monotonic() + 300
    while True:
        health = subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")], env=base,
                                capture_output=True, text=True, timeout=60, check=False)
        if health.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr

    shards = disjoint_shards(tmp_path, clients=3, per_client=40, seed=3)
    clients = [
        _entry("client", {**base, "FEDSITE_TOKEN": tokens[i], "FEDSITE_DATA": str(shards[i]),
                          "FEDSITE_COORDINATOR": f"127.0.0.1:{port}", "FEDSITE_STATE_DIR": str(tmp_path / f"state{i}"),
                          "FEDSITE_DATA_DIR": str(tmp_path / f"data{i}"), "FEDSITE_CLIENT_NAME": f"c{i}"},
               tmp_path / f"client{i}.log")
        for i in range(3)
    ]
    codes = wait_all([coordinator, *clients], timeout_s=600)
    logs = {p.name: tail(p, 30) for p in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0, 0], logs
    job = (tmp_path / "coordinator" / "job.toml").read_text()
    assert f'client_ca = "{tmp_path / "certs" / "ca.pem"}"' in job  # mutual TLS was on
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["round"] == 1 and records[-1]["status"] == "ok" and records[-1]["completed_clients"] == 3
    assert (run_dir / "final" / "config.json").exists()
    for name, text in logs.items():
        assert "Traceback" not in text and "WITHOUT TLS" not in text, (name, text)


def _check_dashboard(run_dir: Path, ca: Path, port: str, token: str) -> None:
    """As the compose stack serves it: HTTPS with the job's server certificate, on every interface, behind
    the token (a request without it is refused)."""
    assert wait_for_text(run_dir / "dashboard", "https://", timeout_s=300)
    assert (run_dir / "dashboard").read_text().strip().endswith(f":{port}/")
    context = ssl.create_default_context(cafile=str(ca))
    url = f"https://127.0.0.1:{port}/api/status"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=context, timeout=60)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        status = json.loads(response.read())
    assert status["job"] == "compose-demo", status


# -- with a Docker engine ----------------------------------------------------------------------------


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


needs_engine = pytest.mark.skipif(not _engine_answers(),
                                  reason="no Docker engine reachable (start one: bash docker/engine.sh)")


def _build(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "docker" / "build.sh"), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False, cwd=str(REPO))


@needs_engine
@pytest.mark.parametrize(("args", "names"), [
    (["--base", "fedsite-test/no-such-image:0"], "base image 'fedsite-test/no-such-image:0' is not here"),
    (["--offline", "--wheelhouse", "docker/ca-certificates"], "'docker/ca-certificates' has no wheels"),
    (["--wheelhouse", "/tmp"], "must be inside this checkout"),
    (["--wheelhouse", "docker/no-such-folder"], "no wheelhouse folder 'docker/no-such-folder'"),
    (["--ca-certs", "docker/wheelhouse"], "holds no *.crt files"),
    (["--colour", "blue"], "unknown option '--colour'"),
])
def test_bad_build_arguments_fail_in_one_line_naming_what_is_missing(args: list[str], names: str) -> None:
    if "--base" not in args:  # get past the base-image check with any image this engine has
        images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True, check=True).stdout.split()
        images = [image for image in images if "<none>" not in image]
        if not images:
            pytest.skip("no local image to stand in as the base")
        args = ["--base", images[0], *args]
    done = _build(*args)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    one_line = done.stderr.count("\n") == 1 and done.stderr.startswith("build: error: ")
    assert one_line and names in done.stderr, done.stderr


@needs_engine
@pytest.mark.long
def test_the_image_refuses_an_empty_wheelhouse_in_one_line() -> None:
    """The same check inside the Dockerfile, for a plain `docker build` that skips docker/build.sh."""
    base = "local/debian:bookworm"
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True, check=False).returncode != 0:
        pytest.skip(f"no {base} (bash docker/engine.sh builds it)")
    done = subprocess.run(["docker", "build", "--force-rm", "--build-arg", f"BASE_IMAGE={base}",
                           "--build-arg", "OFFLINE=1", "--build-arg", "WHEELHOUSE=docker/ca-certificates",
                           "--target", "deps", "-q", "."],
                          capture_output=True, text=True, timeout=1200, check=False, cwd=str(REPO))
    assert done.returncode != 0
    assert ("fedsite image: error: OFFLINE=1 but the wheelhouse docker/ca-certificates has no wheels: "
            "run bash docker/wheelhouse.sh first") in done.stderr + done.stdout, done.stderr[-2000:]


def _script(name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSITE_", "PYTHON", "VIRTUAL_ENV", "RAY_"))}
    return subprocess.run(["bash", str(REPO / "docker" / name)], capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False, cwd=str(REPO))


@needs_engine
@pytest.mark.long
def test_smoke_script_builds_and_runs_the_compose_stack_end_to_end() -> None:
    done = _script("smoke.sh", timeout_s=3600)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = done.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("smoke: OK: "), done.stdout
    assert "3 rounds x 3 clients over mutual TLS" in summary[0] and "final/ loads" in summary[0]
    print("\n" + summary[0])


@needs_engine
@pytest.mark.long
def test_killed_coordinator_resumes_and_killed_client_rejoins_in_compose() -> None:
    done = _script("faults.sh", timeout_s=3600)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = done.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("faults: OK: "), done.stdout
    assert "rounds 0..6 each exactly once, all ok" in summary[0]
    print("\n" + summary[0])


def test_packages_unpack_safely_on_a_python_without_tar_filters(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's Python (3.11.2, also the air-gapped image's) predates tarfile's extraction filters:
    unpacking must refuse what the data filter refuses (paths out of the folder, links) all the same."""
    import io
    import tarfile

    from emulator.package import PackageError, pack, unpack

    monkeypatch.delattr(tarfile, "data_filter")
    source = tmp_path / "src"
    (source / "model").mkdir(parents=True)
    (source / "model" / "weights.bin").write_bytes(b"\0" * 10)
    (source / "job.json").write_text("{}")
    unpack(pack(source), tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "job.json", "model", "model/weights.bin"]
    for name, kind in (("../escape", tarfile.REGTYPE), ("/abs", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(PackageError, match="refusing package member"):
            unpack(buffer.getvalue(), tmp_path / f"bad-{kind!r}")
    assert not (tmp_path / "escape").exists()
