"""Delegating runs to sandbox service hosts over HTTP, and the service to run on those hosts.

Service (one per sandbox host; each job runs in a local :class:`Sandbox`)::

    export MEGATRON_SEED_SANDBOX_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python -m megatron_seed.sandbox.remote --host 127.0.0.1 --port 8900 --workers 8

Client::

    RemoteSandbox("https://sandbox-1:8900")                      # token from $MEGATRON_SEED_SANDBOX_TOKEN
    RemoteSandbox(["http://sandbox-1:8900", "http://sandbox-2:8900"], token=token)

It has :class:`Sandbox`'s ``run`` / ``run_many`` and returns the same :class:`Result` objects;
when the service fails (unreachable, busy past ``retry_for``, a rejected request) the Result has
status ``sandbox_error`` and says why: it never raises for a service failure. ``run_many`` splits
the jobs into contiguous slices, one ``POST /run_many`` per host in parallel, results in input
order; a slice whose host fails is sent to another host.

Authentication: a shared token, from ``$MEGATRON_SEED_SANDBOX_TOKEN`` or ``--token-file`` (never
the command line, which ``ps`` shows), at least 16 characters. Clients send
``Authorization: Bearer <token>``; the service compares in constant time. Without a token the
service serves loopback only (and says so on stderr); a non-loopback ``--host`` without a token
is refused unless ``--insecure-no-auth``. The token is not encryption: across machines, put the
service on loopback behind a TLS-terminating reverse proxy (nginx, caddy) and give clients the
``https://`` URL.

Endpoints (JSON in, JSON out)::

    POST /run       {"code", "language"?, "stdin"?, "test_code"?, "limits"?}  -> a Result
    POST /run_many  {"jobs": [job, ...]}                                    -> {"results": [Result, ...]}
    GET  /health    -> {"status": "ok"}  (no token needed; says nothing else)

Errors are ``{"error": message, "field": name}`` (field when one is at fault) with 400 (not
JSON, unknown / missing / wrongly typed field, unknown language, a limit above the host's
maximum), 401 (token missing or wrong), 404, 405, 408 (request not received within
``--request-timeout``), 411 (no Content-Length), 413 (body, code, stdin or job count over the
host's limits), 503 + ``Retry-After`` (wait line or connection cap full), 500 (a bug; details go
to the service's stderr only).

Limits: the body size is checked against Content-Length before a byte of it is read
(``--max-body-bytes``, default 4 MiB), then code + test_code (``--max-code-bytes``), stdin
(``--max-stdin-bytes``) and jobs per batch (``--max-batch-jobs``). A job's ``limits`` may not
exceed the host's maxima (``--max-wall-seconds``, ``--max-cpu-seconds``, ``--max-memory-bytes``,
``--max-processes``, ``--max-file-bytes``, ``--max-open-files``, ``--max-output-bytes``,
``--max-kill-output-bytes``): such a job is rejected with 400, not clamped, since a verdict
under other limits than asked for would be silently wrong; a job without ``limits`` gets the
defaults capped at those maxima. ``--workers`` jobs run at once (each is a process: about one per
core), ``--queue`` requests wait for them, ``--max-connections`` connections are open at once
(those still sending included); beyond that 503 + Retry-After. A client that does not send its
whole request within ``--request-timeout`` seconds is dropped (408 for a body) without holding a
worker. Memory of the service is therefore bounded by about max-connections x max-body-bytes for
requests plus workers x (jobs x 2 x output_bytes) for answers being built.
"""

from __future__ import annotations

import sys

from megatron_seed.sandbox.remote_client import RemoteSandbox
from megatron_seed.sandbox.remote_service import ServiceConfig, check_exposure, main, make_server

__all__ = ["RemoteSandbox", "ServiceConfig", "check_exposure", "main", "make_server"]

if __name__ == "__main__":
    sys.exit(main())
