"""Delegating runs to a sandbox service over HTTP, and a minimal service to run on sandbox hosts.

Client: ``RemoteSandbox("http://sandbox-host:8900")`` has :class:`Sandbox`'s ``run`` /
``run_many``; each run is ``POST /run`` with JSON ``{code, language, stdin, test_code, limits}``
and the response is a :class:`Result` as JSON. Scale out by running many hosts behind a load
balancer; the client only needs the URL (no other network access is made).

Service: ``python -m megatron_seed.sandbox.remote --host 0.0.0.0 --port 8900 --workers 8`` runs a
local :class:`Sandbox` per host. It has no authentication: bind it to a private network.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from megatron_seed.sandbox.runner import Limits, Result, Sandbox


class RemoteSandbox:
    def __init__(self, url: str, timeout: float = 120.0, max_workers: int = 8):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_workers = max_workers

    def run(self, code: str, language: str = "python", stdin: str = "", test_code: Optional[str] = None,
            limits: Optional[Limits] = None) -> Result:
        body = json.dumps({"code": code, "language": language, "stdin": stdin, "test_code": test_code,
                           "limits": asdict(limits) if limits else None}).encode()
        request = urllib.request.Request(self.url + "/run", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return Result(**json.loads(response.read()))
        except (OSError, ValueError, TypeError) as e:
            return Result("sandbox_error", None, "", f"sandbox service {self.url}: {e}", 0.0, 0.0, detail=str(e))

    def run_many(self, jobs: list[dict]) -> list[Result]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda job: self.run(**job), jobs))


def make_server(host: str, port: int, sandbox: Sandbox) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            if self.path != "/run":
                self.send_error(404, "POST /run")
                return
            try:
                job = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                limits = job.pop("limits", None)
                result = sandbox.run(limits=Limits(**limits) if limits else None, **job)
            except (ValueError, TypeError) as e:
                self.send_error(400, f"bad request: {e}")
                return
            payload = json.dumps(result.to_dict()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet: one line per request is noise at thousands/s
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_seed.sandbox.remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    server = make_server(args.host, args.port, Sandbox(max_workers=args.workers))
    print(f"[sandbox] serving on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
