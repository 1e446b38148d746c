"""`serve`: options -> model -> (quantized) engine -> FastAPI app -> uvicorn on 127.0.0.1.

Loading, quantizing and serving are separate steps so that tests build the app around an engine
they made themselves, and the launcher (launch.py) only ever sees the CLI.
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from server_shim.engine import Engine
from server_shim.option_rules import refuse_serve_options
from server_shim.options import ServeOptions

logger = logging.getLogger(__name__)


def build_engine(opts: ServeOptions) -> Engine:  # type: ignore[valid-type]
    """load_model, then quantize in place when a scheme or a fault asks for it."""
    from server_shim.models import load_model
    from server_shim.switches import check_switches

    # before the model loads, and the rules difftest's config check runs: a value no machine can
    # serve (dtype, device, rounding noise) or a flag that can do nothing stops the start at once
    refuse_serve_options(opts)
    check_switches()  # a mistyped on/off variable stops the server here, not at a first request
    from server_shim.debug import response_cap

    response_cap()  # likewise the debug routes' byte cap
    loaded = load_model(opts.model, dtype=opts.dtype, device=opts.device, seed=opts.seed)
    if opts.quant != "none" or opts.faults:
        from server_shim.quant.linear import quantize_model

        summary = quantize_model(
            loaded.model,
            scheme=opts.quant,
            backend=opts.backend,
            skip=opts.quant_skip,
            faults=opts.faults,
            ck_free=opts.ck_free or None,  # None: the DIFFTEST_CK_FREE environment variable decides
        )
        loaded.quant = opts.quant
        logger.info(
            "quantized %d modules with %s (backend %s)", len(summary.modules), opts.quant, opts.backend
        )
    if opts.rounding_noise not in ("", "0"):
        from server_shim.twin import apply_rounding_twin, resolve_amplitude

        amplitude = resolve_amplitude(opts.rounding_noise)  # refuse_serve_options checked it
        dtype = str(loaded.dtype).removeprefix("torch.")
        loaded.rounding_noise = apply_rounding_twin(loaded.model, amplitude, seed=opts.seed, dtype=dtype)
    engine = Engine(
        loaded,
        batch_invariant=opts.batch_invariant,
        max_batch_size=opts.max_batch_size,
        max_waiting=opts.max_waiting,
        cuda_graphs=False if opts.no_cuda_graphs else None,  # None: on for CUDA unless the env says 0
        fused_decode=False if opts.no_fused_decode else None,  # None: on for CUDA unless the env says 0
    )
    if opts.quant != "none":
        from server_shim.quant.warmup import warm_m_sizes, warm_up

        rows = max(engine.max_batch_size, *(engine.buckets or (1,)))
        warm_up(
            loaded.model, warm_m_sizes(rows, engine.prefill_chunk), dtype=loaded.dtype, device=loaded.device
        )
    if opts.max_model_len is not None:
        if opts.max_model_len > engine.context_length:
            logger.warning(
                "--max-model-len %d is above the model's %d positions; keeping %d",
                opts.max_model_len,
                engine.context_length,
                engine.context_length,
            )
        engine.context_length = min(engine.context_length, opts.max_model_len)
    return engine


def run_server(opts: ServeOptions) -> None:  # type: ignore[valid-type]
    """Build the engine and serve until interrupted (blocking)."""
    from server_shim.app import create_app

    engine = build_engine(opts)
    app = create_app(engine, opts)
    loaded = engine.loaded
    how = f"{loaded.device}, {str(loaded.dtype).removeprefix('torch.')}"
    how += ", batch-invariant" if opts.batch_invariant else ""
    # log_config=None: keep the logging that the CLI configured (--log-level) for uvicorn too.
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_config=None, access_log=False)
    try:
        ShimServer(config, loaded.name, how).run()
    finally:
        engine.close()


class ShimServer(uvicorn.Server):
    """uvicorn's server, saying "serving ... on URL" once it listens. Said before the bind, the
    line named port 0 for `--port 0`, and a port that was in use (the bind then failed)."""

    def __init__(self, config: uvicorn.Config, name: str, how: str) -> None:
        super().__init__(config)
        self.name, self.how = name, how

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)  # a failed bind is logged there, and exits 3
        if self.started:
            host = self.config.host
            host = f"[{host}]" if ":" in host else host
            logger.info("serving %s on http://%s:%d (%s)", self.name, host, self.bound_port(), self.how)

    def bound_port(self) -> int:
        """The port the listening socket got: `--port 0` asks the kernel for a free one."""
        for server in getattr(self, "servers", ()):  # uvicorn's asyncio servers, once started
            for sock in server.sockets or ():
                return int(sock.getsockname()[1])
        return int(self.config.port)
