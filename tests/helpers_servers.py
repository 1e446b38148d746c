"""A stand-alone fake OpenAI server for launcher tests: stdlib only, starts in ~50 ms, no torch.

    python tests/helpers_servers.py --port P [--host H] [--name N] [--delay S] [--exit CODE]
        [--no-health] [--api-key K] [--child-pid-file F] [--ignore-term] [--print-env NAME]...

--delay S          sleep before listening (a slow engine start)
--wait-file F      before listening, wait until F exists (a start that ends when a test says so)
--exit CODE        print a message and exit at once (a server that dies while starting)
--no-health        404 on /health, so the launcher must fall back to /v1/models (like some engines)
--api-key K        401 without "Authorization: Bearer K"
--child-pid-file F fork a sleeping child into the same process group and write its pid to F
                   (teardown must reach workers, not only the leader)
--ignore-term      ignore SIGTERM (teardown must escalate to SIGKILL)
--print-env NAME   log NAME=value (and cwd=...) at start, to check the env / gpus / cwd a spec sets
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="fake")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--wait-file", default=None)
    p.add_argument("--exit", type=int, default=None)
    p.add_argument("--no-health", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--child-pid-file", default=None)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--print-env", action="append", default=[])
    args = p.parse_args()

    print(f"fake server {args.name} starting", flush=True)
    for name in args.print_env:
        print(f"{name}={os.environ.get(name)}", flush=True)
    if args.print_env:
        print(f"cwd={os.getcwd()}", flush=True)
    if args.exit is not None:
        print("fatal: CUDA out of memory (pretend)", flush=True)
        return args.exit
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.child_pid_file, "w") as fh:
            fh.write(str(child.pid))
    time.sleep(args.delay)
    while args.wait_file and not os.path.exists(args.wait_file):
        time.sleep(0.05)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                return self._send(401, {"error": {"message": "bad key"}})
            if self.path == "/health" and not args.no_health:
                return self._send(200, {})
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": args.name, "object": "model"}]})
            return self._send(404, {"error": {"message": "not found"}})

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *a: object) -> None:
            print(fmt % a, flush=True)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
