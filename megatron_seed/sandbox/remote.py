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

import argparse
import os
import signal
import sys

from megatron_seed.platform.cli import add_check_config, config_ok
from megatron_seed.sandbox.remote_client import RemoteSandbox
from megatron_seed.sandbox.remote_service import (LIMIT_FIELDS, TOKEN_ENV, ServiceConfig, capped, check_exposure,
                                                  default_max_limits, load_token, make_server, parse_size)
from megatron_seed.sandbox.runner import Limits, Sandbox

__all__ = ["RemoteSandbox", "ServiceConfig", "check_exposure", "main", "make_server"]


def main(argv=None) -> int:
    # allow_abbrev=False: "--token SECRET" must be an error, not "--token-file SECRET"
    p = argparse.ArgumentParser(prog="python -m megatron_seed.sandbox.remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="sandbox runs at once; about the host's cores (default: %(default)s)")
    p.add_argument("--queue", type=int, default=None, help="requests waiting for a worker (default 4 x workers)")
    p.add_argument("--max-connections", type=int, default=None, help="open connections (default workers+queue+32)")
    p.add_argument("--token-file", default=None, help=f"file holding the shared token (else ${TOKEN_ENV})")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow serving a non-loopback address without a token")
    p.add_argument("--max-body-bytes", type=parse_size, default=ServiceConfig.max_body_bytes)
    p.add_argument("--max-code-bytes", type=parse_size, default=ServiceConfig.max_code_bytes)
    p.add_argument("--max-stdin-bytes", type=parse_size, default=ServiceConfig.max_stdin_bytes)
    p.add_argument("--max-batch-jobs", type=int, default=ServiceConfig.max_batch_jobs)
    p.add_argument("--request-timeout", type=float, default=ServiceConfig.request_timeout,
                   help="seconds for a request to arrive, and per socket read/write")
    p.add_argument("--retry-after", type=int, default=ServiceConfig.retry_after, help="seconds, sent with 503")
    maxima = default_max_limits()
    for name in LIMIT_FIELDS:  # one flag per Limits field: the most a job may ask for
        kind = float if name == "wall_seconds" else (parse_size if name.endswith("_bytes") else int)
        p.add_argument(f"--max-{name.replace('_', '-')}", dest=f"max_{name}", type=kind, default=getattr(maxima, name),
                       help="per job (memory 0: no maximum)" if name == "memory_bytes" else "per job")
    add_check_config(p)
    args = p.parse_args(argv)
    try:
        token = load_token(args.token_file)
        max_limits = Limits(**{name: getattr(args, f"max_{name}") for name in LIMIT_FIELDS})
        if args.workers < 1 or (args.queue is not None and args.queue < 0):
            raise ValueError("--workers must be >= 1 and --queue >= 0")
        check_exposure(args.host, token, args.insecure_no_auth)  # before anything starts
    except (OSError, ValueError) as e:
        print(f"[sandbox] error: {e}", file=sys.stderr)
        return 2
    if config_ok(args, p.prog):
        return 0
    config = ServiceConfig(workers=args.workers, queue=args.queue, max_connections=args.max_connections,
                           max_body_bytes=args.max_body_bytes, max_code_bytes=args.max_code_bytes,
                           max_stdin_bytes=args.max_stdin_bytes, max_batch_jobs=args.max_batch_jobs,
                           max_limits=max_limits, request_timeout=args.request_timeout, retry_after=args.retry_after)
    sandbox = Sandbox(limits=capped(Limits(), max_limits), max_workers=args.workers)
    try:
        server = make_server(args.host, args.port, sandbox, token=token, insecure_no_auth=args.insecure_no_auth,
                             config=config)
    except (OSError, ValueError) as e:
        sandbox.close()
        print(f"[sandbox] error: {e}", file=sys.stderr)
        return 2
    # SIGTERM ends serve_forever like Ctrl-C does, so the finally below removes the sandbox's files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host = server.server_address[0]
    shown = f"[{host}]" if ":" in host else host
    print(f"[sandbox] serving on http://{shown}:{server.server_address[1]}", file=sys.stderr, flush=True)
    if token is None:
        print(f"[sandbox] warning: no token ({TOKEN_ENV} or --token-file): anyone who can reach "
              f"{shown}:{server.server_address[1]} can run code here", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
