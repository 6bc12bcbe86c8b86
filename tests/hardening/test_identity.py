"""Identity and client state: one token backs one live client; a state folder from another job is not reused.

Real agents (client.agent.Agent) against the real servicer over loopback; the packages are small tars, since
these checks end before training.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.agent import Agent, AgentOptions
from coordinator.mailbox import Mailbox
from coordinator.registry import ClientRegistry
from coordinator.server import RunningServer, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from emulator.package import pack
from localio.data import DataError
from localio.errors import UserError
from protos import fedsite_pb2 as pb
from protos.codec import sha256_hex

TAKEOVER_S = 3.0


def _package(tmp: Path, name: str) -> PackageBlob:
    folder = tmp / f"src-{name}"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({"job_name": name, "task": "classification"}))
    blob = pack(folder)
    return PackageBlob(blob, sha256_hex(blob))


class Coordinator:
    def __init__(self, tmp: Path, name: str, tokens: list[str]) -> None:
        self.registry = ClientRegistry.from_tokens(tokens, takeover_after_s=TAKEOVER_S)
        self.package = _package(tmp, name)
        self.servicer = CoordinatorServicer(job_name=name, registry=self.registry,
                                            mailbox=Mailbox(self.registry, heartbeat_timeout_s=TAKEOVER_S),
                                            package=self.package)
        self.server: RunningServer = start_server(self.servicer, "127.0.0.1:0")
        self.address = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def job_a(tmp_path: Path) -> Iterator[Coordinator]:
    coordinator = Coordinator(tmp_path, "job-a", ["tok-a", "tok-shared"])
    yield coordinator
    coordinator.close()


def _agent(address: str, token: str, state: Path, data: Path) -> Agent:
    return Agent(AgentOptions(coordinator=address, token=token, data=data, state_dir=state, give_up_after_s=5.0))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a word", "label": "x"}\n')
    return path


def test_a_second_client_with_a_live_token_is_refused_and_a_silent_ones_token_is_taken_over(
        job_a: Coordinator, tmp_path: Path, data: Path) -> None:
    first = _agent(job_a.address, "tok-shared", tmp_path / "first", data)
    first.enrol()
    assert first.credentials is not None
    creds = first.credentials
    beating = threading.Event()
    beating.set()

    def heartbeat() -> None:  # the first client is alive: it keeps beating
        while beating.is_set():
            first.stub.Heartbeat(pb.HeartbeatRequest(credentials=creds), timeout=5, metadata=first._session())
            time.sleep(0.3)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    second = _agent(job_a.address, "tok-shared", tmp_path / "second", data)
    started = time.monotonic()
    with pytest.raises(UserError, match="token in use by another client since") as info:
        second.enrol()
    assert "can be taken over once that client has been silent for 3s" in str(info.value)
    assert TAKEOVER_S <= time.monotonic() - started < TAKEOVER_S + 20  # it waited once for a takeover
    first.stub.PollTask(pb.PollRequest(credentials=creds), timeout=5)  # the first client never noticed
    beating.clear()
    beat.join()
    # the first client goes silent: after the heartbeat timeout its token may be taken over
    time.sleep(TAKEOVER_S + 0.5)
    second.enrol(force=True)
    assert second.credentials is not None and second.credentials.client_id == creds.client_id
    with pytest.raises(grpc.RpcError) as refused:
        first.stub.PollTask(pb.PollRequest(credentials=creds), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # ... and the first one coming back cannot take it back while the second lives: no ping-pong
    second_creds = second.credentials
    stop = threading.Event()

    def second_beats() -> None:
        while not stop.is_set():
            second.stub.Heartbeat(pb.HeartbeatRequest(credentials=second_creds), timeout=5)
            time.sleep(0.3)

    keeper = threading.Thread(target=second_beats, daemon=True)
    keeper.start()
    try:
        with pytest.raises(UserError, match="token in use"):
            first.enrol(force=True)
    finally:
        stop.set()
        keeper.join()
    for agent in (first, second):
        agent.channel.close()


def test_a_state_folder_of_another_job_is_not_reused(job_a: Coordinator, tmp_path: Path, data: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    agent = _agent(job_a.address, "tok-a", state, data)
    agent.enrol()
    folder_a = agent.fetch_package()
    assert json.loads((folder_a / "job.json").read_text())["job_name"] == "job-a"
    assert agent.fetch_package() == folder_a  # the same job: reused, not downloaded again
    agent.channel.close()
    # job B elsewhere, the same state folder (a valid token of job B)
    job_b = Coordinator(tmp_path, "job-b", ["tok-b"])
    try:
        caplog.set_level(logging.WARNING, logger="fedsite.client")
        other = _agent(job_b.address, "tok-b", state, data)
        other.enrol()
        folder_b = other.fetch_package()
        assert json.loads((folder_b / "job.json").read_text())["job_name"] == "job-b"
        assert "is not the one" in caplog.text
        other.channel.close()
    finally:
        job_b.close()
    # job C at job A's address (the coordinator was restarted with another job, still preparing its package when
    # the client enrolled, so the enrolment announced none): the client asks which package is served now
    job_a.servicer.registry = ClientRegistry.from_tokens(["tok-a"], takeover_after_s=TAKEOVER_S)
    job_a.servicer.package = None
    again = _agent(job_a.address, "tok-a", state, data)
    again.enrol()
    assert again.announced_package == ""
    job_a.servicer.set_package(_package(tmp_path, "job-c"))
    folder_c = again.fetch_package()
    assert json.loads((folder_c / "job.json").read_text())["job_name"] == "job-c"
    assert again.fetch_package() == folder_c  # and once it holds it, keeps it
    again.channel.close()


def test_a_bad_data_file_fails_before_enrolling(tmp_path: Path, job_a: Coordinator) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    agent = _agent(job_a.address, "tok-a", tmp_path / "state", bad)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        agent.run()
    assert job_a.registry.enrolled() == 0  # nothing reached the coordinator
    agent.channel.close()
