"""A fake engine (tests/fakes.py) as its own process, for what needs a real pid: a server
SIGKILLed mid-run, servers that must be gone after `difftest run` is interrupted.

    python tests/fake_engine.py --port P [--sigkill-after N --once FILE] [--request-log FILE]
        [--pid-file FILE] [--delay S] [--api-key-env NAME]

--sigkill-after N  the process SIGKILLs itself at its N+1-th completions request ...
--once FILE        ... unless FILE exists (it is created at start): a relaunch then serves on
--request-log F    one JSON line per completions request ({prompt, run}) and one more
                   ({..., answered}) once its answer is sent: what a run asked and got
--pid-file F       append this process's pid
--delay S          sleep S seconds before each completions answer (a run slow enough to interrupt)
--api-key-env NAME require the key held in that environment variable (never on the command line)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes import FakeBehaviour, make_fake_app  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sigkill-after", type=int)
    p.add_argument("--once")
    p.add_argument("--request-log")
    p.add_argument("--pid-file")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--api-key-env")
    args = p.parse_args()
    if args.pid_file:
        with open(args.pid_file, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    die_after = args.sigkill_after
    if args.once:
        if Path(args.once).exists():
            die_after = None
        Path(args.once).touch()
    behaviour = FakeBehaviour(
        die_after=die_after,
        die_mode="sigkill",
        delay_s=args.delay,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
    )
    app: Any = make_fake_app(behaviour)
    if args.request_log:
        app = _logged(app, args.request_log)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error", lifespan="off")
    return 0


def _logged(app: Any, path: str) -> Any:
    """ASGI wrapper: one line per POST /v1/completions, written before the app answers."""

    async def wrapper(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            req = json.loads(body)
            line = {
                "prompt": req.get("prompt"),
                "run": "seed" in req,
            }  # the differ's run requests carry a seed
        except (ValueError, AttributeError):
            line = {"prompt": None, "run": False}
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # then: wait for the disconnect as the app expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def answer(message: dict) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with open(path, "a") as fh:  # sent in full: the client has it unless it drops it
                    fh.write(json.dumps(line | {"answered": True}) + "\n")

        await app(scope, replay, answer)

    return wrapper


if __name__ == "__main__":
    sys.exit(main())
