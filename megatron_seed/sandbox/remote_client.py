"""The client of the sandbox HTTP service (protocol and deployment: see ``remote.py``)."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Optional, Sequence, Union

from megatron_seed.sandbox.runner import Limits, Result

TOKEN_ENV = "MEGATRON_SEED_SANDBOX_TOKEN"
_RESULT_FIELDS = {f.name for f in fields(Result)}
_RETRY_STATUSES = (429, 502, 503, 504)  # busy, or a proxy in front of a host that is down/restarting


class _Retry(Exception):
    """A failure worth another try; ``other_host``: only on another host (this one timed out or
    refused, and a job that timed out may still be running there)."""

    def __init__(self, message: str, retry_after: float = 0.0, other_host: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.retry_after, self.other_host, self.timed_out = retry_after, other_host, timed_out


class RemoteSandbox:
    """:class:`Sandbox`'s ``run`` / ``run_many`` on one or more sandbox service hosts.

    ``urls``: one URL or a list. ``token``: the shared token (default: $MEGATRON_SEED_SANDBOX_TOKEN).
    ``timeout``: seconds per socket operation of a single run (a batch adds its jobs' wall limits).
    A host that is busy (503) or unreachable is retried with exponential backoff and jitter
    (another host first, when there are several) until ``retry_for`` seconds have passed; then
    the run's Result is ``sandbox_error`` saying why. Service failures never raise.
    ``max_workers``: how many jobs callers should hand over at once (they size their batches by
    it); what runs at once is each host's ``--workers``."""

    def __init__(self, urls: Union[str, Sequence[str]], timeout: float = 120.0, max_workers: int = 8,
                 token: Optional[str] = None, retry_for: float = 60.0, backoff: float = 0.1, max_backoff: float = 5.0,
                 batch_jobs: int = 256, max_request_bytes: int = 4 << 20):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("no sandbox service URL")
        for i, url in enumerate(self.urls):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"not an http(s) URL: {url!r}")
            self.urls[i] = url.rstrip("/")
        self.url = self.urls[0]
        self.timeout, self.max_workers = timeout, max_workers
        self.retry_for, self.backoff, self.max_backoff = retry_for, backoff, max_backoff
        self.batch_jobs, self.max_request_bytes = batch_jobs, max_request_bytes
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.token = token.strip() or None
        if self.token and any(c.isspace() or not c.isprintable() for c in self.token):
            raise ValueError("the token must be one word of printable characters")
        # requests, retries, http_<status> and error_<kind> counts (for benches and operators)
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._next_host = itertools.count()  # round robin of single runs over the hosts

    # ------------------------------------------------------------------ Sandbox's API
    def run(self, code: str, language: str = "python", stdin: str = "", test_code: Optional[str] = None,
            limits: Optional[Limits] = None) -> Result:
        job = _job(code, language, stdin, test_code, limits)
        body = json.dumps(job).encode()
        data, error = self._post("/run", body, self.timeout, next(self._next_host) % len(self.urls))
        if error:
            return _error(error)
        try:
            return _result(data)
        except ValueError as e:
            return _error(f"sandbox service: malformed answer: {e}")

    def run_many(self, jobs: list[dict]) -> list[Result]:
        """``jobs`` (keyword arguments of :meth:`run`) split into contiguous slices, one per host,
        sent in parallel as ``POST /run_many``; a slice whose host fails goes to another host.
        Results in input order."""
        if not jobs:
            return []
        encoded = [json.dumps(_job(**job)).encode() for job in jobs]  # TypeError for unknown keys, as Sandbox
        walls = [getattr(job.get("limits"), "wall_seconds", Limits.wall_seconds) for job in jobs]
        hosts = min(len(self.urls), len(jobs))
        bounds = [len(jobs) * h // hosts for h in range(hosts + 1)]

        def slice_results(host: int) -> list[Result]:
            results = []
            for lo, hi in self._chunks(encoded, bounds[host], bounds[host + 1]):
                body = b'{"jobs": [' + b", ".join(encoded[lo:hi]) + b"]}"
                data, error = self._post("/run_many", body, self.timeout + sum(walls[lo:hi]), host)
                if not error:
                    try:
                        if not isinstance(data, dict) or not isinstance(data.get("results"), list) \
                                or len(data["results"]) != hi - lo:
                            raise ValueError("not a list of one result per job")
                        results += [_result(r) for r in data["results"]]
                        continue
                    except ValueError as e:
                        error = f"sandbox service: malformed answer: {e}"
                results += [_error(error) for _ in range(lo, hi)]  # distinct objects: callers may edit them
            return results

        if hosts == 1:
            return slice_results(0)
        with ThreadPoolExecutor(hosts) as pool:
            return [r for part in pool.map(slice_results, range(hosts)) for r in part]

    def close(self) -> None:  # nothing held between calls; here for callers that close any sandbox
        pass

    # ------------------------------------------------------------------ transport
    def _chunks(self, encoded: list[bytes], lo: int, hi: int):
        """[lo, hi) in requests of at most ``batch_jobs`` jobs and ``max_request_bytes`` (a single
        job over that goes alone; the host answers 413 if it is over its own limit)."""
        start, size = lo, 0
        for i in range(lo, hi):
            n = len(encoded[i]) + 2
            if i > start and (i - start >= self.batch_jobs or size + n > self.max_request_bytes - 64):
                yield start, i
                start, size = i, 0
            size += n
        if start < hi:
            yield start, hi

    def _count(self, *keys: str) -> None:
        with self._stats_lock:
            for key in keys:
                self.stats[key] += 1

    def _post(self, path: str, body: bytes, timeout: float, first: int):
        """(decoded JSON answer, None) or (None, message). Tries hosts from ``first`` on."""
        start = time.monotonic()
        deadline = start + self.retry_for
        avoid: set[int] = set()  # hosts that failed this call: the others are tried first
        host, attempt, n = first, 0, len(self.urls)
        while True:
            url = self.urls[host] + path
            try:
                return self._attempt(url, body, timeout), None
            except _Fail as e:
                return None, str(e)
            except _Retry as e:
                last = e
            attempt += 1
            if last.other_host:
                if n == 1 and last.timed_out:  # the job may still be running there: do not pile on
                    return None, f"sandbox service {url}: {last}"
                avoid.add(host)
                if len(avoid) == n:  # every host failed once: start over (a host may be restarting)
                    avoid.clear()
            # the next host round the ring that has not failed (a busy one too: spread the load)
            host = next(h for h in ((host + i) % n for i in range(1, n + 1)) if h not in avoid)
            delay = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)
            if last.retry_after:  # the host asked for this much; jitter so a crowd does not return at once
                delay = max(delay, last.retry_after * random.uniform(1.0, 1.25))
            if time.monotonic() + delay > deadline:
                return None, (f"sandbox service unavailable: gave up after {attempt} attempt(s) in "
                              f"{time.monotonic() - start:.1f} s (retry_for={self.retry_for:g} s); last: {url}: {last}")
            self._count("retries")
            time.sleep(delay)

    def _attempt(self, url: str, body: bytes, timeout: float):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        self._count("requests")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            self._count(f"http_{e.code}")
            message = _error_message(e)
            if e.code in _RETRY_STATUSES:
                raise _Retry(f"HTTP {e.code}: {message}", _retry_after(e.headers.get("Retry-After"))) from None
            hint = f" (the token comes from ${TOKEN_ENV} or token=)" if e.code == 401 else ""
            raise _Fail(f"sandbox service {url}: HTTP {e.code}: {message}{hint}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # OSError: refused, reset, timeout
            reason = getattr(e, "reason", e)
            self._count("connection_errors", f"error_{type(reason).__name__}")
            if isinstance(reason, TimeoutError):
                raise _Retry(f"timed out after {timeout:g} s", other_host=True, timed_out=True) from None
            raise _Retry(f"{type(reason).__name__}: {reason}", other_host=True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Fail(f"sandbox service {url}: malformed answer (not JSON)") from None


class _Fail(Exception):
    """A failure not worth retrying (400, 401, 413, ...): becomes the runs' sandbox_error."""


def _job(code: str, language: str = "python", stdin: str = "", test_code: Optional[str] = None,
         limits: Optional[Limits] = None) -> dict:
    return {"code": code, "language": language, "stdin": stdin, "test_code": test_code,
            "limits": asdict(limits) if limits else None}


def _result(data) -> Result:
    if not isinstance(data, dict) or set(data) != _RESULT_FIELDS or not isinstance(data.get("status"), str):
        raise ValueError("not a result")
    return Result(**data)


def _error(message: str) -> Result:
    return Result("sandbox_error", None, "", message, 0.0, 0.0, detail=message)


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(65536))
        message = str(body["error"])
        return message + (f" (field {body['field']})" if body.get("field") else "")
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        return e.reason if isinstance(e.reason, str) else "error"


def _retry_after(value: Optional[str]) -> float:
    try:
        return min(max(float(value), 0.0), 60.0) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: the backoff decides
