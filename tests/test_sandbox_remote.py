"""The sandbox HTTP service on a network: the token, sizes checked before reading, JSON errors that
say nothing of the service's insides, slow and crowding clients, batches over two hosts.
Loopback and port 0 only."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import psutil
import pytest

from megatron_seed.sandbox import Sandbox
from megatron_seed.sandbox.remote import RemoteSandbox, ServiceConfig, check_exposure, main, make_server
from megatron_seed.sandbox.remote_service import TOKEN_ENV, default_max_limits

from helpers import ROOT, subprocess_env

TOKEN = "test-token-" + "k" * 24
# What must never reach a client: tracebacks, file paths, exception class names, HTML pages.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|[A-Z]\w*(Error|Exception)\b|<html|<!DOCTYPE|Python/|BaseHTTP|__")


@pytest.fixture(scope="module")
def box():
    with Sandbox(max_workers=2) as sandbox:
        yield sandbox


@contextlib.contextmanager
def serving(box, token=TOKEN, **config):
    server = make_server("127.0.0.1", 0, box, token=token, config=ServiceConfig(**config))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def parse(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def read_all(sock) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def exchange(port: int, data: bytes, timeout: float = 10.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return parse(read_all(sock))


def head(method="POST", path="/run", token=TOKEN, length=None, extra=()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sandbox"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def request(port, body=b"", method="POST", path="/run", token=TOKEN, extra=()):
    """A well-formed request with the body's true length."""
    return exchange(port, head(method, path, token, len(body), extra) + body)


def json_error(answer, status: int, field=None) -> dict:
    """The answer is ``status`` with a JSON error body naming ``field`` and nothing internal."""
    got, headers, body = answer
    assert got == status, (got, body[:300])
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)
    assert set(error) <= {"error", "field"} and isinstance(error["error"], str) and error["error"]
    assert error.get("field") == field, error
    assert not INTERNALS.search(body.decode()), body
    return error


def job(**fields) -> bytes:
    return json.dumps({"code": "print(6 * 7)", **fields}).encode()


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused


# ---------------------------------------------------------------------------------- token
def test_token_is_required_and_checked(box, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with serving(box) as (server, url):
        port = server.server_address[1]
        error = json_error(request(port, job(), token=None), 401)
        assert "Bearer" in error["error"]
        assert request(port, job(), token=None)[1]["www-authenticate"].startswith("Bearer")
        json_error(request(port, job(), token=TOKEN[:-1] + "X"), 401)
        json_error(request(port, job(), token=TOKEN + "X"), 401)
        json_error(request(port, job(), token=None, extra=(f"Authorization: Basic {TOKEN}",)), 401)
        json_error(request(port, job(), path="/elsewhere", token=None), 401)  # nothing said without the token
        status, _, body = request(port, job())
        assert status == 200 and json.loads(body)["stdout"] == "42\n"
        status, _, body = exchange(port, head("GET", "/health", token=None))
        assert (status, json.loads(body)) == (200, {"status": "ok"})

        t0 = time.monotonic()
        r = RemoteSandbox(url, retry_for=10).run("print(1)")  # no token: a clear error, not retried
        assert r.status == "sandbox_error" and "HTTP 401" in r.stderr and TOKEN_ENV in r.stderr
        assert time.monotonic() - t0 < 2
        assert RemoteSandbox(url, token="w" * 30).run("print(1)").status == "sandbox_error"
        assert RemoteSandbox(url, token=TOKEN).run("print(1)").stdout == "1\n"
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert RemoteSandbox(url).run("print(2)").stdout == "2\n"
    assert server.stats[500] == 0


def test_no_token_is_served_on_loopback_only(box, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="insecure-no-auth"):
        make_server("0.0.0.0", 0, box)  # refused before binding anything
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ValueError):
            check_exposure(host, None, False)
    check_exposure("0.0.0.0", None, True)
    check_exposure("0.0.0.0", TOKEN, False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, False)
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to serve on 0.0.0.0 without a token" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main(["--port", "0"]) == 2
    assert "at least 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--token", TOKEN])  # no such flag: a token on the command line shows in ps


def test_cli_warns_when_open_and_reads_a_token_file(tmp_path):
    env = subprocess_env()
    env.pop(TOKEN_ENV, None)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cmd = [sys.executable, "-m", "megatron_seed.sandbox.remote", "--port", "0", "--workers", "1"]
    open_proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    guarded = subprocess.Popen(cmd + ["--token-file", str(token_file)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = open_proc.stderr.readline()
        assert "serving on http://127.0.0.1:" in line, line
        assert "warning: no token" in open_proc.stderr.readline()
        line = guarded.stderr.readline()
        assert "serving on http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        json_error(request(port, job(), token=None), 401)
        status, _, body = request(port, job())
        assert status == 200 and json.loads(body)["status"] == "passed"
        guarded.terminate()  # SIGTERM: a clean exit that removes the sandbox's directory
        assert guarded.wait(timeout=10) == 0
        assert "warning" not in guarded.stderr.read()
    finally:
        for proc in (open_proc, guarded):
            proc.kill()
            proc.wait()
            proc.stderr.close()


# ---------------------------------------------------------------------------------- sizes and schema
def test_content_length_is_checked_before_the_body_is_read(box):
    with serving(box, max_body_bytes=64 << 10) as (server, _):
        port = server.server_address[1]
        rss = psutil.Process().memory_info().rss
        t0 = time.monotonic()
        error = json_error(exchange(port, head(length=999999999999) + b'{"code": "'), 413)
        assert time.monotonic() - t0 < 1.0 and "999999999999" in error["error"]
        assert psutil.Process().memory_info().rss - rss < 32 << 20
        json_error(exchange(port, head(length=None) + job()), 411)
        json_error(exchange(port, head(length=None, extra=("Transfer-Encoding: chunked",)) + b"5\r\nhello\r\n0\r\n\r\n"),
                   411)
        for bad in ("abc", "-1", "1e3", " ", "99999999999999999999999"):
            json_error(exchange(port, head(length=bad) + job()), 400)
        json_error(exchange(port, head(length=len(job()), extra=(f"Content-Length: {len(job())}",)) + job()), 400)
        big = job(stdin="x" * (100 << 10))  # a real body over the limit: the answer still arrives whole
        json_error(request(port, big), 413)
        json_error(exchange(port, head(token=None, length=len(big)) + big), 401)
    assert server.stats[500] == 0


MAX_CODE, MAX_STDIN, MAX_JOBS = 1000, 500, 4
BAD_REQUESTS = [  # (path, body, status, field)
    ("/run", b"{not json", 400, None),
    ("/run", b"\xff\xfe{}", 400, None),
    ("/run", b"[" * 100000 + b"]" * 100000, 400, None),
    ("/run", b'{"code": NaN}', 400, None),
    ("/run", b"[1, 2]", 400, None),
    ("/run", b"{}", 400, "code"),
    ("/run", b'{"code": 5}', 400, "code"),
    ("/run", job(stdin=None), 400, "stdin"),
    ("/run", job(test_code=7), 400, "test_code"),
    ("/run", job(language="cobol"), 400, "language"),
    ("/run", job(language=["python"]), 400, "language"),
    ("/run", job(timeout=3), 400, "timeout"),
    ("/run", job(limits=[10]), 400, "limits"),
    ("/run", job(limits={"cpu_seconds": "10"}), 400, "limits.cpu_seconds"),
    ("/run", job(limits={"cpu_seconds": True}), 400, "limits.cpu_seconds"),
    ("/run", job(limits={"cpu_seconds": 0}), 400, "limits.cpu_seconds"),
    ("/run", job(limits={"cpu_seconds": 2.5}), 400, "limits.cpu_seconds"),
    ("/run", job(limits={"wall_seconds": -1}), 400, "limits.wall_seconds"),
    ("/run", job(limits={"gpus": 1}), 400, "limits.gpus"),
    ("/run", job(code="x" * (MAX_CODE + 1)), 413, "code"),
    ("/run", job(code="x" * 600, test_code="y" * 600), 413, "test_code"),
    ("/run", job(stdin="x" * (MAX_STDIN + 1)), 413, "stdin"),
    ("/run", job(limits={"wall_seconds": 61}), 400, "limits.wall_seconds"),
    ("/run", job(limits={"cpu_seconds": 10 ** 30}), 400, "limits.cpu_seconds"),
    ("/run", job(limits={"memory_bytes": 0}), 400, "limits.memory_bytes"),
    ("/run", job(limits={"memory_bytes": 5 << 30}), 400, "limits.memory_bytes"),
    ("/run", job(limits={"processes": 100000}), 400, "limits.processes"),
    ("/run_many", b"[]", 400, None),
    ("/run_many", b'{"jobs": {}}', 400, "jobs"),
    ("/run_many", b'{"jobs": [], "parallel": true}', 400, "parallel"),
    ("/run_many", json.dumps({"jobs": [{"code": "1"}] * (MAX_JOBS + 1)}).encode(), 413, "jobs"),
    ("/run_many", b'{"jobs": [{"code": "1"}, {"code": 1}]}', 400, "jobs[1].code"),
    ("/run_many", b'{"jobs": [{"code": "1"}, 3]}', 400, "jobs[1]"),
    ("/run_many", b'{"jobs": [{"code": "1", "limits": {"wall_seconds": 1000}}]}', 400, "jobs[0].limits.wall_seconds"),
]


def test_malformed_requests_get_json_errors_without_internals(box):
    with serving(box, max_code_bytes=MAX_CODE, max_stdin_bytes=MAX_STDIN, max_batch_jobs=MAX_JOBS) as (server, _):
        port = server.server_address[1]
        for path, body, status, field in BAD_REQUESTS:
            json_error(request(port, body, path=path), status, field)
        json_error(request(port, job(), method="GET"), 405)
        assert request(port, job(), method="GET")[1]["allow"] == "POST"
        json_error(request(port, job(), method="DELETE", path="/run_many"), 405)
        json_error(request(port, job(), path="/run/"), 404)
        json_error(request(port, job(), path="/health"), 405)
        json_error(request(port, job(), method="BREW"), 501)
        json_error(exchange(port, b"GARBAGE\r\n\r\n"), 400)
        json_error(exchange(port, b"POST /run HTTP/7.1\r\n\r\n"), 505)
        json_error(exchange(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"), 414)
        # the service still works, and none of that was an internal error
        status, _, body = request(port, job(limits={"wall_seconds": 5, "memory_bytes": 256 << 20}))
        assert status == 200 and json.loads(body)["stdout"] == "42\n"
    assert server.stats[500] == 0


def test_jobs_without_limits_get_the_hosts_maxima(box):
    with serving(box, max_limits=replace(default_max_limits(), wall_seconds=1.0, cpu_seconds=1)) as (server, url):
        r = RemoteSandbox(url, token=TOKEN).run("import time\ntime.sleep(5)")
        assert r.status == "timeout" and r.wall_time < 2.5


# ---------------------------------------------------------------------------------- slow and crowding clients
def test_a_slow_client_is_dropped_without_holding_up_others(box):
    with serving(box, request_timeout=1.0) as (server, url):
        port = server.server_address[1]
        body = job()
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(head(length=len(body)) + body[:len(body) // 2])  # then nothing more
        t0 = time.monotonic()
        trickle_closed = []

        def trickle():  # header lines, each within the per-read timeout: only the request deadline ends it
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /run HTTP/1.1\r\n")
                sock.setblocking(False)
                start = time.monotonic()
                while time.monotonic() - start < 8:
                    time.sleep(0.2)
                    try:
                        sock.send(b"X-Pad: 1\r\n")
                        if sock.recv(1) == b"":
                            break
                    except BlockingIOError:  # nothing to read yet
                        continue
                    except OSError:
                        break
                trickle_closed.append(time.monotonic() - start)

        thread = threading.Thread(target=trickle)
        thread.start()
        r = RemoteSandbox(url, token=TOKEN).run("print('served')")
        assert r.stdout == "served\n" and time.monotonic() - t0 < 0.8
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):  # the slow one has had no answer yet
            slow.recv(1)
        slow.settimeout(10)
        json_error(parse(read_all(slow)), 408)
        assert 0.9 < time.monotonic() - t0 < 2.0
        slow.close()
        thread.join()
        assert trickle_closed and 1.0 < trickle_closed[0] < 3.5, trickle_closed
        wait_for(lambda: server.connections() == 0)


def test_a_full_wait_line_answers_503_and_the_client_retries_through_it(box):
    with serving(box, workers=1, queue=0, retry_after=1) as (server, url):
        port = server.server_address[1]
        first = []
        sleeper = threading.Thread(target=lambda: first.append(
            RemoteSandbox(url, token=TOKEN).run("import time\ntime.sleep(1.5)\nprint('slept')")))
        sleeper.start()
        wait_for(lambda: server.gate.busy() == (1, 0))
        answer = request(port, job())
        json_error(answer, 503)
        assert answer[1]["retry-after"] == "1"
        impatient = RemoteSandbox(url, token=TOKEN, retry_for=0.5).run("print(1)")
        assert impatient.status == "sandbox_error" and "gave up" in impatient.stderr and "HTTP 503" in impatient.stderr
        patient = RemoteSandbox(url, token=TOKEN, retry_for=20)
        r = patient.run("print('after')")
        assert r.stdout == "after\n" and patient.stats["http_503"] >= 1 and patient.stats["retries"] >= 1
        sleeper.join()
        assert first[0].stdout == "slept\n"


def test_connections_over_the_cap_get_503_at_once(box):
    with serving(box, max_connections=1) as (server, _):
        port = server.server_address[1]
        idle = socket.create_connection(("127.0.0.1", port))
        wait_for(lambda: server.connections() == 1)
        answer = request(port, job())
        json_error(answer, 503)
        assert answer[1]["retry-after"] == "1"
        idle.close()
        wait_for(lambda: server.connections() == 0)
        assert request(port, job())[0] == 200


# ---------------------------------------------------------------------------------- batches
def test_batches_keep_order_across_two_hosts_and_move_off_a_dead_one(box):
    jobs = [{"code": f"print({i})" if i != 3 else "raise SystemExit(3)"} for i in range(7)]
    want = [("failed", "") if i == 3 else ("passed", f"{i}\n") for i in range(7)]
    with serving(box) as (one, url1), serving(box) as (two, url2):
        results = RemoteSandbox([url1, url2], token=TOKEN).run_many(jobs)
        assert [(r.status, r.stdout) for r in results] == want
        assert one.stats[200] == 1 and two.stats[200] == 1  # one request per host

        remote = RemoteSandbox([dead_url(), url2], token=TOKEN, retry_for=10)
        results = remote.run_many(jobs)
        assert [(r.status, r.stdout) for r in results] == want
        assert two.stats[200] == 3 and remote.stats["connection_errors"] >= 1

        chunked = RemoteSandbox(url1, token=TOKEN, batch_jobs=3)
        assert [(r.status, r.stdout) for r in chunked.run_many(jobs)] == want
        assert one.stats[200] == 1 + 3 and chunked.run_many([]) == []

        status, _, body = request(one.server_address[1], json.dumps({"jobs": jobs[:4]}).encode(), path="/run_many")
        assert status == 200 and [r["status"] for r in json.loads(body)["results"]] == [s for s, _ in want[:4]]


def test_the_client_gives_up_with_a_sandbox_error():
    t0 = time.monotonic()
    remote = RemoteSandbox([dead_url(), dead_url()], retry_for=0.5)
    r = remote.run("print(1)")
    assert r.status == "sandbox_error" and "gave up" in r.stderr and "ConnectionRefusedError" in r.stderr
    results = remote.run_many([{"code": "print(1)"}] * 3)
    assert [r.status for r in results] == ["sandbox_error"] * 3
    assert time.monotonic() - t0 < 3 and remote.stats["retries"] >= 2
    with pytest.raises(ValueError):
        RemoteSandbox("ftp://host/")
