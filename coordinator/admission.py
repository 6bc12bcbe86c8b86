"""Admission: no peer can tie up the coordinator's workers before it has a session, and health always answers.

gRPC's synchronous server gives every call a worker thread as soon as its
headers arrive. A unary handler's thread then waits for the request message,
a streaming one in ``next(request_iterator)``, with no time limit: a peer
that opens calls and sends nothing (no token needed, and the grpc library
itself can do it by calling any method as a client stream) held all 64
workers, so health checks timed out and honest clients were dropped as
silent. This interceptor wraps every call:

- Every method becomes request-streaming on the server side, so the wrapper
  runs before any message has arrived and reads the first one itself, with
  a deadline (``first_message_s``); a call still silent then is cancelled.
- A call that presents a valid session in its metadata (fedsite clients send
  ``fedsite-client-id`` and ``fedsite-session`` on every call) runs in the main
  pool, at most ``per_client`` at once per client. Anything else (enrolment,
  reflection, clients that carry their credentials only in the message) runs
  in a pool of its own, and at most ``per_peer_method`` such calls per address
  and method (``per_peer`` per address) may be waiting for their first
  message; more are refused at once with RESOURCE_EXHAUSTED. So peers without
  a session cannot starve the clients that have one.
- Health checks have a small pool and a per-address quota of their own, so
  they answer while the rest is under attack. Long-lived calls without a
  session (health Watch, reflection) are capped in number.
- A request stream (Upload) that stops sending for ``idle_s`` is cancelled.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from protos.metadata import CLIENT_ID_KEY, SESSION_KEY

log = logging.getLogger("fedsite.admission")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LONG_LIVED = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})

Authenticate = Callable[[str, str], bool]  # (client id, session key) -> valid?


def peer_address(context: grpc.ServicerContext) -> str:
    """The caller's host without its port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7")."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


@dataclass
class AdmissionLimits:
    """How many calls of each kind may wait or run, per address and per client.

    Counted per address and per client so that one peer cannot take what the others need; one
    field per limit, so a test or a large deployment moves it without touching the interceptor.
    """
    first_message_s: float = 10.0  # a call must send its first message within this
    idle_s: float = 120.0  # a request stream must send its next message within this
    per_peer_method: int = 8  # calls without a session waiting for their first message, per address and method
    per_peer: int = 24  # the same, per address over all methods
    health_per_peer: int = 4  # health checks waiting for their request, per address
    per_client: int = 8  # calls in flight per client with a session
    long_lived: int = 8  # health Watch / reflection streams without a session, each
    anonymous_workers: int = 64
    health_workers: int = 8


class Watchdog:
    """Cancels calls whose deadline passes; one daemon thread for all of them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[grpc.ServicerContext, str]] = {}
        self._tickets = itertools.count()
        self._closed = False
        self.cancelled: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="fedsite-admission-watchdog", daemon=True)
        self._thread.start()

    def arm(self, context: grpc.ServicerContext, seconds: float, why: str) -> int:
        """Cancel ``context`` after ``seconds`` unless disarmed; the ticket disarms it (``why`` is counted)."""
        ticket = next(self._tickets)
        with self._cond:
            self._armed[ticket] = (context, why)
            heapq.heappush(self._heap, (time.monotonic() + seconds, ticket))
            self._cond.notify()
        return ticket

    def disarm(self, ticket: int) -> None:
        """The call got what it was waiting for in time: forget its deadline."""
        with self._cond:
            self._armed.pop(ticket, None)

    def close(self) -> None:
        """Stop the thread; armed calls are no longer cancelled (the server is stopping them anyway)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            due: list[tuple[grpc.ServicerContext, str]] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._armed):
                    _, ticket = heapq.heappop(self._heap)
                    armed = self._armed.pop(ticket, None)
                    if armed is not None:
                        due.append(armed)
                if not due:
                    self._cond.wait(timeout=self._heap[0][0] - now if self._heap else None)
            for context, why in due:
                self.cancelled[why] += 1
                context.cancel()


class _Quota:
    """Counts per key under a limit; ``take`` is refused (False) when the key is full."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            if self._counts[key] >= self.limit:
                return False
            self._counts[key] += 1
            return True

    def give(self, key: str) -> None:
        with self._lock:
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]


class _Slot:
    """One quota unit held by one call, given back exactly once (when the call ends or stops waiting)."""

    def __init__(self, quota: _Quota, key: str) -> None:
        self._quota, self._key = quota, key
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._quota.give(self._key)


class Admission(grpc.ServerInterceptor):
    """The gRPC interceptor that applies the module's rules: sessions first, quotas for the rest.

    One instance per server; :meth:`close` releases its pools and watchdog when the server stops.
    """
    def __init__(self, authenticate: Authenticate, limits: AdmissionLimits | None = None) -> None:
        self.authenticate = authenticate
        self.limits = limits or AdmissionLimits()
        self.watchdog = Watchdog()
        self.refused: Counter[str] = Counter()
        self._pending = _Quota(self.limits.per_peer)
        self._pending_method = _Quota(self.limits.per_peer_method)
        self._health_pending = _Quota(self.limits.health_per_peer)
        self._per_client = _Quota(self.limits.per_client)
        self._long_lived = _Quota(self.limits.long_lived)
        self.anonymous_pool = futures.ThreadPoolExecutor(self.limits.anonymous_workers,
                                                         thread_name_prefix="fedsite-anonymous")
        self.health_pool = futures.ThreadPoolExecutor(self.limits.health_workers, thread_name_prefix="fedsite-health")

    def close(self) -> None:
        """Stop the watchdog and the extra pools without waiting: the server is going away."""
        self.watchdog.close()
        self.anonymous_pool.shutdown(wait=False, cancel_futures=True)
        self.health_pool.shutdown(wait=False, cancel_futures=True)

    # -- interception (gRPC's polling thread: keep it quick) -------------------------------

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """gRPC's hook: wrap the method's handler so admission runs in the call's own thread.

        It runs on gRPC's polling thread, so it only looks at metadata and picks a pool; the
        waiting for the first message happens later, where a slow peer holds only its own worker.
        """
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        client_id = metadata.get(CLIENT_ID_KEY, "")
        session = metadata.get(SESSION_KEY, "")
        if not (isinstance(client_id, str) and isinstance(session, str)):
            client_id = session = ""
        known = bool(client_id and session) and self.authenticate(client_id, session)
        pool = None if known else (self.health_pool if method == HEALTH_CHECK else self.anonymous_pool)
        return _wrap(handler, lambda context: self._admit(method, client_id if known else "", context), self, pool)

    # -- admission (in the call's worker thread, before its first message) ------------------

    def _admit(self, method: str, client_id: str, context: grpc.ServicerContext) -> list[_Slot]:
        """Take this call's quota slots; return those it holds only until its first message arrives.

        The others (per client, long-lived streams) go back when the call ends.
        """
        if client_id:
            self._hold(self._per_client, client_id, context,
                       f"more than {self.limits.per_client} concurrent calls from this client")
            return []
        if method in LONG_LIVED:
            self._hold(self._long_lived, method, context, f"too many open {method.rsplit('/', 1)[-1]} streams")
        address = peer_address(context)
        why = ("too many calls without a session waiting to send their first message from this address; send the "
               "request, or wait and retry")
        if method == HEALTH_CHECK:
            return [self._hold(self._health_pending, address, context, why)]
        return [self._hold(self._pending_method, f"{address} {method}", context, why),
                self._hold(self._pending, address, context, why)]

    def _hold(self, quota: _Quota, key: str, context: grpc.ServicerContext, why: str) -> _Slot:
        if not quota.take(key):
            self.refused[why] += 1
            if self.refused[why] in (1, 10, 100) or self.refused[why] % 1000 == 0:
                log.warning("%d calls refused: %s", self.refused[why], why)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        slot = _Slot(quota, key)
        context.add_callback(slot.release)
        return slot

    def first_message(self, requests: Iterator[bytes], context: grpc.ServicerContext, decode: Decode) -> Any:
        """The call's first request message, within ``first_message_s`` (else the call is cancelled)."""
        ticket = self.watchdog.arm(context, self.limits.first_message_s, "no first message in time")
        try:
            first = next(requests, None)
        finally:
            self.watchdog.disarm(ticket)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before its request message")
            raise AssertionError("unreachable: abort raises")
        return _decoded(first, decode, context)

    def guarded(self, requests: Iterator[bytes], context: grpc.ServicerContext, decode: Decode) -> Iterator[Any]:
        """The rest of a request stream, each message within ``idle_s`` of the previous one."""
        while True:
            ticket = self.watchdog.arm(context, self.limits.idle_s, "request stream idle")
            try:
                item = next(requests, None)
            finally:
                self.watchdog.disarm(ticket)
            if item is None:
                return
            yield _decoded(item, decode, context)


Decode = Callable[[bytes], Any] | None


def _decoded(raw: bytes, decode: Decode, context: grpc.ServicerContext) -> Any:
    """A request message parsed here, not by gRPC: gRPC answers bytes that do not parse with INTERNAL and leaves
    the HTTP/2 stream open on the connection (100 such calls and the connection refused every new call); here
    they are an INVALID_ARGUMENT like any other bad request."""
    if decode is None:
        return raw
    try:
        return decode(raw)
    except Exception:  # protobuf's DecodeError and friends
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message for this method")


Admit = Callable[[grpc.ServicerContext], list[_Slot]]


def _wrap(handler: grpc.RpcMethodHandler, admit: Admit, admission: Admission,
          pool: futures.ThreadPoolExecutor | None) -> grpc.RpcMethodHandler:
    """``handler`` as a request-streaming handler that admits the call and reads its first message itself."""

    decode = handler.request_deserializer

    def start(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        waiting = admit(context)
        first = admission.first_message(requests, context, decode)
        for slot in waiting:  # a call that has its first message is no longer waiting for it
            slot.release()
        return first

    def rest(first: Any, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        yield first
        yield from admission.guarded(requests, context, decode)

    if handler.request_streaming and handler.response_streaming:
        def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            first = start(requests, context)
            yield from handler.stream_stream(rest(first, requests, context), context)
        new = grpc.stream_stream_rpc_method_handler(behavior, None,  # bytes: parsed by _decoded
                                                    handler.response_serializer)
    elif handler.request_streaming:
        def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
            first = start(requests, context)
            return handler.stream_unary(rest(first, requests, context), context)
        new = grpc.stream_unary_rpc_method_handler(behavior, None,  # bytes: parsed by _decoded
                                                   handler.response_serializer)
    elif handler.response_streaming:
        def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            first = start(requests, context)
            yield from handler.unary_stream(first, context)
        new = grpc.stream_stream_rpc_method_handler(behavior, None,  # bytes: parsed by _decoded
                                                    handler.response_serializer)
    else:
        def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
            first = start(requests, context)
            return handler.unary_unary(first, context)
        new = grpc.stream_unary_rpc_method_handler(behavior, None,  # bytes: parsed by _decoded
                                                   handler.response_serializer)
    if pool is not None:  # gRPC runs a behavior that names a pool there (grpc/_server.py)
        behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return new
