"""The sandbox HTTP service (protocol, flags and deployment: see ``remote.py``).

Requests go through, in order: connection cap (503), token (401), method and path (404/405),
Content-Length (411/400/413, before any body byte is read), body within the request deadline
(408), JSON and job schema (400/413), the wait line (503 + Retry-After), then the run (200).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from megatron_seed.platform.units import parse_bytes
from megatron_seed.sandbox.languages import LANGUAGES
from megatron_seed.sandbox.runner import Limits, Sandbox

TOKEN_ENV = "MEGATRON_SEED_SANDBOX_TOKEN"
MIN_TOKEN_CHARS = 16
JOB_FIELDS = ("code", "language", "stdin", "test_code", "limits")
LIMIT_FIELDS = tuple(f.name for f in fields(Limits))
# Lowest value a client may ask for: cpu_seconds 0 would kill at once (RLIMIT_CPU 0), and
# memory_bytes 0 means "unlimited", which only a host without a memory maximum allows.
_LIMIT_FLOOR = {"cpu_seconds": 1, "processes": 1, "open_files": 1, "kill_output_bytes": 1}
_LINGER_SECONDS = 1.0  # how long a refused connection is kept half-open so the client reads the 503
_MAX_LINGERING = 1024  # beyond this, refused connections are closed at once (fds are finite)


def default_max_limits() -> Limits:
    """The most a job may ask for unless the host says otherwise (``--max-*`` flags)."""
    return Limits(wall_seconds=60.0, cpu_seconds=60, memory_bytes=4 << 30, processes=256, file_bytes=256 << 20,
                  open_files=1024, output_bytes=4 << 20, kill_output_bytes=64 << 20)


@dataclass
class ServiceConfig:
    """What one service host accepts. ``workers``: sandbox runs at once (default: the Sandbox's
    ``max_workers``); ``queue``: requests waiting for a worker beyond those running (default
    4 x workers), more get 503; ``max_connections``: open connections, those still sending
    included (default workers + queue + 32), more get 503 at once; ``request_timeout``: seconds
    for a whole request (headers and body) to arrive, and for each socket read or write."""
    workers: Optional[int] = None
    queue: Optional[int] = None
    max_connections: Optional[int] = None
    max_body_bytes: int = 4 << 20
    max_code_bytes: int = 1 << 20
    max_stdin_bytes: int = 1 << 20
    max_batch_jobs: int = 256
    max_limits: Limits = field(default_factory=default_max_limits)
    request_timeout: float = 30.0
    retry_after: int = 1


class Reject(Exception):
    """An answer other than 200: status, a message for the client, the offending field."""

    def __init__(self, status: int, error: str, field: Optional[str] = None, headers: tuple = ()):
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


# ---------------------------------------------------------------------------------- validation
def parse_json(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Reject(400, "request body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise Reject(400, f"request body is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError):  # NaN/Infinity, over-long integers, nesting deeper than the parser's stack
        raise Reject(400, "request body is not valid JSON") from None


def _no_constant(name: str):
    raise ValueError(name)


def _short(key) -> str:
    return str(key)[:100]  # field names are echoed back: never a megabyte of them


def validate_job(job, config: ServiceConfig, defaults: Limits, where: str = "") -> dict:
    """A job as keyword arguments of ``Sandbox.run``, or :class:`Reject` naming the field.
    Each type is checked here, explicitly, so no error from deeper down reaches a client."""
    if not isinstance(job, dict):
        raise Reject(400, "a job must be a JSON object", where.rstrip(".") or None)
    for key in job:
        if key not in JOB_FIELDS:
            raise Reject(400, f"unknown field; known: {', '.join(JOB_FIELDS)}", where + _short(key))
    if "code" not in job:
        raise Reject(400, "missing required field", where + "code")
    code, language = job["code"], job.get("language", "python")
    stdin, test_code = job.get("stdin", ""), job.get("test_code")
    for name, value, nullable in (("code", code, False), ("language", language, False), ("stdin", stdin, False),
                                  ("test_code", test_code, True)):
        if not (isinstance(value, str) or (nullable and value is None)):
            raise Reject(400, "must be a string" + (" or null" if nullable else ""), where + name)
    if language not in LANGUAGES:
        raise Reject(400, f"unknown language; known: {', '.join(sorted(LANGUAGES))}", where + "language")
    code_bytes = len(code.encode("utf-8", "surrogatepass"))
    if code_bytes > config.max_code_bytes:
        raise Reject(413, f"code is {code_bytes} bytes; this host accepts at most {config.max_code_bytes}",
                     where + "code")
    test_bytes = len(test_code.encode("utf-8", "surrogatepass")) if test_code else 0
    if code_bytes + test_bytes > config.max_code_bytes:
        raise Reject(413, f"code and test_code are {code_bytes + test_bytes} bytes together; this host accepts at "
                          f"most {config.max_code_bytes}", where + "test_code")
    stdin_bytes = len(stdin.encode("utf-8", "surrogatepass"))
    if stdin_bytes > config.max_stdin_bytes:
        raise Reject(413, f"stdin is {stdin_bytes} bytes; this host accepts at most {config.max_stdin_bytes}",
                     where + "stdin")
    limits = job.get("limits")
    if limits is None:
        limits = defaults
    elif isinstance(limits, dict):
        limits = validate_limits(limits, config.max_limits, defaults, where + "limits.")
    else:
        raise Reject(400, "must be an object or null", where + "limits")
    return {"code": code, "language": language, "stdin": stdin, "test_code": test_code, "limits": limits}


def validate_limits(limits: dict, maxima: Limits, defaults: Limits, where: str = "limits.") -> Limits:
    """Rejects (400) rather than clamps a value above the host's maximum: a job judged under
    other limits than it asked for would get a verdict it did not ask for (a "timeout" at 60 s
    for a job that allowed itself 120 s) with nothing in the result saying so."""
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise Reject(400, f"unknown limit; known: {', '.join(LIMIT_FIELDS)}", where + _short(name))
        if name == "wall_seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise Reject(400, "must be a positive number", where + name)
        elif isinstance(value, bool) or not isinstance(value, int) or value < _LIMIT_FLOOR.get(name, 0):
            raise Reject(400, f"must be an integer >= {_LIMIT_FLOOR.get(name, 0)}", where + name)
        cap = getattr(maxima, name)
        if name == "memory_bytes" and cap and value == 0:
            raise Reject(400, f"0 (unlimited) is above this host's maximum of {cap}", where + name)
        if not (name == "memory_bytes" and cap == 0) and value > cap:
            raise Reject(400, f"{value} is above this host's maximum of {cap}", where + name)
    return replace(defaults, **limits)


def capped(limits: Limits, maxima: Limits) -> Limits:
    """``limits`` with each field at most the host's maximum (memory 0 = unlimited on both sides):
    the limits of jobs that name none."""
    values = {}
    for name in LIMIT_FIELDS:
        value, cap = getattr(limits, name), getattr(maxima, name)
        if name == "memory_bytes":
            values[name] = value if cap == 0 else (cap if value == 0 else min(value, cap))
        else:
            values[name] = min(value, cap)
    return Limits(**values)


# ---------------------------------------------------------------------------------- admission
class Gate:
    """At most ``workers`` sandbox runs at once, and at most ``queue`` requests waiting for them,
    served first come, first served. A batch takes min(jobs, workers) slots for its whole run,
    since ``Sandbox.run_many`` runs that many at once."""

    def __init__(self, workers: int, queue: int):
        self.workers, self.queue = workers, queue
        self._free = workers
        self._waiting: deque = deque()
        self._cond = threading.Condition()

    def acquire(self, jobs: int) -> Optional[int]:
        """The slots taken (give them to :meth:`release`), or None when the wait line is full."""
        need = max(1, min(jobs, self.workers))
        with self._cond:
            if not self._waiting and self._free >= need:
                self._free -= need
                return need
            if len(self._waiting) >= self.queue:
                return None
            ticket = object()
            self._waiting.append(ticket)
            while self._waiting[0] is not ticket or self._free < need:
                self._cond.wait()
            self._waiting.popleft()
            self._free -= need
            self._cond.notify_all()  # the next in line may fit in what is left
            return need

    def release(self, slots: int) -> None:
        with self._cond:
            self._free += slots
            self._cond.notify_all()

    def busy(self) -> tuple[int, int]:
        """(slots in use, requests waiting)."""
        with self._cond:
            return self.workers - self._free, len(self._waiting)


# ---------------------------------------------------------------------------------- server
def _json_response(status: int, body: dict, headers: tuple = ()) -> bytes:
    payload = json.dumps(body).encode()
    head = [f"HTTP/1.0 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


class SandboxServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a cap on open connections and a deadline per request.
    ``stats`` counts answers by status code (for operators and tests)."""

    daemon_threads = True

    def __init__(self, address, handler, sandbox: Sandbox, config: ServiceConfig, token: Optional[str]):
        self.sandbox, self.config, self.token = sandbox, config, token
        workers = config.workers or sandbox.max_workers
        queue = config.queue if config.queue is not None else 4 * workers
        self.max_connections = config.max_connections or workers + queue + 32
        # listen backlog: socketserver's 5 overflows when a crowd connects at once, and the kernel
        # then resets connections; over-the-cap ones are better answered 503 by process_request
        self.request_queue_size = max(128, self.max_connections)
        self.gate = Gate(workers, queue)
        self.default_limits = capped(sandbox.limits, config.max_limits)
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._connections = 0
        self._deadlines: dict = {}  # socket -> time by which its request must have arrived
        self._lingering: list = []  # (socket, close time) of refused connections
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves its own name (a reverse DNS lookup that can stall): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def count(self, status: int) -> None:
        with self._lock:
            self.stats[status] += 1

    def connections(self) -> int:
        with self._lock:
            return self._connections

    def process_request(self, request, client_address):
        with self._lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:  # answered from the accepting thread: no thread is started for it
            self.count(503)
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._connections -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections -= 1

    def _refuse(self, request) -> None:
        """A canned 503, then a half-close; the socket is closed a moment later by
        ``service_actions``: closing it with the request unread would send a reset that can
        destroy the answer before the client reads it."""
        body = _json_response(503, {"error": "too many connections; retry later"},
                              (("Retry-After", str(self.config.retry_after)),))
        try:
            request.setblocking(False)
            _drain_nonblocking(request)
            request.send(body)  # a few hundred bytes: fits a fresh socket's send buffer
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            if len(self._lingering) < _MAX_LINGERING:
                self._lingering.append((request, time.monotonic() + _LINGER_SECONDS))
                return
        request.close()

    def track(self, sock) -> float:
        deadline = time.monotonic() + self.config.request_timeout
        with self._lock:
            self._deadlines[sock] = deadline
        return deadline

    def untrack(self, sock) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def service_actions(self):
        """Called by serve_forever every poll interval: drops connections whose request did not
        arrive in time. The handler's own deadline answers 408 for a slow body; this catches a
        client trickling header lines, which socket timeouts alone (per read) never stop."""
        now = time.monotonic()
        grace = 1.0  # let the handler answer 408 itself first
        with self._lock:
            late = [s for s, d in self._deadlines.items() if now > d + grace]
            for s in late:
                del self._deadlines[s]
            done = [s for s, t in self._lingering if now >= t]
            self._lingering = [(s, t) for s, t in self._lingering if now < t]
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns: it ends
            except OSError:
                pass
        for s in done:
            _drain_nonblocking(s)
            s.close()

    def server_close(self):
        super().server_close()
        with self._lock:
            lingering, self._lingering = self._lingering, []
        for s, _ in lingering:
            s.close()


def _drain_nonblocking(sock, limit: int = 1 << 20) -> None:
    total = 0
    try:
        while total < limit:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            if not chunk:
                return
            total += len(chunk)
    except OSError:
        pass


_GENERIC_ERRORS = {400: "malformed request", 404: "not found", 405: "method not allowed",
                   408: "request not received in time", 414: "request line too long",
                   431: "request headers too large", 501: "method not supported", 505: "HTTP version not supported"}


class Handler(BaseHTTPRequestHandler):
    server: SandboxServer
    server_version = "megatron-seed-sandbox"
    sys_version = ""
    timeout = 30.0  # per socket read/write; make_server sets the configured one

    # ---------------------------------------------------------------- connection
    def setup(self):
        super().setup()
        self._deadline = self.server.track(self.connection)
        self._unread = 0  # body bytes announced and not read: drained after an early answer

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self):  # no interpreter version in the Server header
        return self.server_version

    def log_message(self, *args):  # one line per request is noise at thousands per second; see stats
        pass

    # ---------------------------------------------------------------- dispatch
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/health":  # for load balancers and proxies: says nothing but "up"
            self._reply(200, {"status": "ok"})
            return
        self._handle()

    def do_POST(self):  # noqa: N802
        self._handle()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST  # noqa: N815 - 405 with a JSON body

    def _handle(self):
        try:
            self._serve()
        except Reject as e:
            self._error(e.status, e.error, e.field, e.headers)
        except (ConnectionError, TimeoutError):  # the client went away or stopped reading
            self.close_connection = True
        except Exception:  # a bug here: the traceback goes to the operator, never to the client
            traceback.print_exc(file=sys.stderr)
            self._error(500, "internal error")

    def _serve(self):
        if not self._authorized():
            raise Reject(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                         headers=(("WWW-Authenticate", 'Bearer realm="sandbox"'),))
        if self.path == "/health":
            raise Reject(405, "/health takes GET", headers=(("Allow", "GET"),))
        if self.path not in ("/run", "/run_many"):
            raise Reject(404, "not found; endpoints: POST /run, POST /run_many, GET /health")
        if self.command != "POST":
            raise Reject(405, f"{self.path} takes POST", headers=(("Allow", "POST"),))
        payload = parse_json(self._read_body())
        config, defaults = self.server.config, self.server.default_limits
        if self.path == "/run":
            jobs = [validate_job(payload, config, defaults)]
        else:
            if not isinstance(payload, dict):
                raise Reject(400, "body must be a JSON object {\"jobs\": [...]}")
            unknown = [k for k in payload if k != "jobs"]
            if unknown:
                raise Reject(400, "unknown field; known: jobs", _short(unknown[0]))
            if not isinstance(payload.get("jobs"), list):
                raise Reject(400, "must be a list of jobs", "jobs")
            if len(payload["jobs"]) > config.max_batch_jobs:
                raise Reject(413, f"{len(payload['jobs'])} jobs; this host takes at most {config.max_batch_jobs} "
                                  "per request", "jobs")
            jobs = [validate_job(job, config, defaults, f"jobs[{i}].") for i, job in enumerate(payload["jobs"])]
        slots = self.server.gate.acquire(len(jobs)) if jobs else 0
        if slots is None:
            raise Reject(503, "all workers busy and the wait line is full; retry later",
                         headers=(("Retry-After", str(config.retry_after)),))
        try:
            if self.path == "/run":
                body = self.server.sandbox.run(**jobs[0]).to_dict()
            else:
                body = {"results": [r.to_dict() for r in self.server.sandbox.run_many(jobs)] if jobs else []}
        finally:
            if slots:
                self.server.gate.release(slots)
        self._reply(200, body)

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise Reject(411, "send the body with a Content-Length (no Transfer-Encoding)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise Reject(411, "Content-Length required")
        if len(values) > 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
            raise Reject(400, "invalid Content-Length")
        length = int(values[0])
        self._unread = length
        limit = self.server.config.max_body_bytes
        if length > limit:  # decided on the announced length, before reading a byte of the body
            raise Reject(413, f"request body of {length} bytes; this host accepts at most {limit}")
        body = bytearray()
        while len(body) < length:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise Reject(408, "request body not received in time")
            self.connection.settimeout(remaining)
            try:
                chunk = self.rfile.read1(min(65536, length - len(body)))
            except TimeoutError:
                raise Reject(408, "request body not received in time") from None
            if not chunk:
                raise ConnectionResetError  # the client closed before sending all it announced
            body += chunk
            self._unread = length - len(body)
        self.connection.settimeout(self.timeout)
        self.server.untrack(self.connection)  # the run itself is bounded by the job's limits
        return bytes(body)

    # ---------------------------------------------------------------- answers
    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"  # a status line and headers even for an unparsable request
        self._reply(int(code), {"error": _GENERIC_ERRORS.get(int(code), HTTPStatus(int(code)).phrase.lower())})

    def _error(self, status: int, error: str, field: Optional[str] = None, headers: tuple = ()):
        body = {"error": error}
        if field:
            body["field"] = field
        try:
            self._reply(status, body, headers)
            if self._unread:
                self._discard_unread()
        except OSError:
            pass
        self.close_connection = True

    def _reply(self, status: int, body: dict, headers: tuple = ()):
        self.server.count(status)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _discard_unread(self):
        """After an early answer (401, 413, ...): half-close, then read and drop what the client
        still sends, for a bounded time and amount, so that closing does not reset the connection
        under the answer. Nothing is kept: a lying Content-Length costs no memory."""
        self.connection.shutdown(socket.SHUT_WR)
        end = min(time.monotonic() + 2.0, self._deadline)
        budget = min(self._unread, self.server.config.max_body_bytes)
        while budget > 0 and time.monotonic() < end:
            self.connection.settimeout(max(end - time.monotonic(), 0.01))
            try:
                chunk = self.connection.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            budget -= len(chunk)


def is_loopback(host: str) -> bool:
    """Every address ``host`` binds to is a loopback address ("" and 0.0.0.0 are not)."""
    try:
        infos = socket.getaddrinfo(host or None, None, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_exposure(host: str, token: Optional[str], insecure_no_auth: bool) -> None:
    """ValueError when serving ``host`` as asked would let anyone on the network run code."""
    if token is not None and not token:
        raise ValueError("the token is empty")
    if token is None and not insecure_no_auth and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host or 'all interfaces'} without a token: set {TOKEN_ENV} "
                         "or --token-file (or pass --insecure-no-auth on a network you trust completely)")


def make_server(host: str, port: int, sandbox: Sandbox, *, token: Optional[str] = None,
                insecure_no_auth: bool = False, config: Optional[ServiceConfig] = None) -> SandboxServer:
    """A service on ``host:port`` running jobs on ``sandbox`` (call ``serve_forever``). Without
    ``token`` it accepts anyone, which is refused (ValueError, before binding) for a non-loopback
    ``host`` unless ``insecure_no_auth``."""
    check_exposure(host, token, insecure_no_auth)
    config = config or ServiceConfig()
    handler = type("Handler", (Handler,), {"timeout": config.request_timeout})
    server_cls = SandboxServer
    if ":" in host:  # an IPv6 literal
        server_cls = type("SandboxServer6", (SandboxServer,), {"address_family": socket.AF_INET6})
    return server_cls((host, port), handler, sandbox, config, token)


# ---------------------------------------------------------------------------------- command line
def load_token(token_file: Optional[str]) -> Optional[str]:
    """The shared token: the file's content if given, else the environment variable, else None.
    Never a command-line value (it would show in ``ps`` and shell history)."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"{token_file} is empty")
        if os.stat(token_file).st_mode & 0o077:
            print(f"[sandbox] warning: {token_file} is readable by other users (chmod 600 it)", file=sys.stderr)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("the token must be one word of printable characters")
    return token


def parse_size(text: str) -> int:
    """``4194304``, ``4MiB``, ``4M``, ``512k``, ``1GiB`` -> bytes (megatron_seed.platform.units; ``4MB``
    is 10^6 there), as an argparse type."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
