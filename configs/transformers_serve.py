"""Start `transformers serve` (Hugging Face's own OpenAI-compatible server) on the same weights the
shim serves: the safetensors folder the shim caches for a preset. configs/external.toml's target.

    {python} transformers_serve.py --host {host} --port {port} [--model smollm2-135m]

Nothing is downloaded: the folder is built by `server_shim prepare` from the GGUF that ships in a
pip package, and HF_HUB_OFFLINE=1 keeps transformers from reaching the Hub.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's server_shim


def model_folder(preset: str) -> Path:
    """The HF folder the shim loads `preset` from (built now if missing)."""
    from server_shim import models

    models.prepare_model(preset)
    folder = models.cache_root() / f"{preset}-{models._CACHE_VERSION}"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"transformers_serve: {preset!r} has no cached HF folder at {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a shim preset with an HF folder cache")
    ap.add_argument("--host", default="127.0.0.1", help="listen address")
    ap.add_argument("--port", type=int, required=True, help="listen port")
    ap.add_argument("--dtype", default="float32", help="weights dtype (the shim's reference uses float32)")
    ap.add_argument("--device", default="cpu", help="device (cpu, cuda:0, ...)")
    args = ap.parse_args(argv)
    folder = model_folder(args.model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder)]
    cmd += ["--host", args.host, "--port", str(args.port), "--dtype", args.dtype, "--device", args.device]
    os.execv(sys.executable, [*cmd, "--log-level", "info"])


if __name__ == "__main__":
    main()
