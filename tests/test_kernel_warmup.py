"""The Triton GEMM warm-up before serving (server_shim/quant/warmup.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server_shim.quant import warmup
from server_shim.quant.linear import QuantLinear, quantize_model


@pytest.mark.parametrize(
    ("max_rows", "chunk", "sizes"),
    [
        (32, 2048, [1, 16, 32, 64, 256, 1024, 2048]),  # the CUDA engine's defaults
        (24, 24, [1, 16, 24]),  # 24 runs in bucket 32: tuned at 24, the size it will run
        (16, 1, [1, 16]),
        (1, 1, [1]),
        (8, 100_000, [1, 16, 32, 64, 256, 1024, 4096]),  # every M above 1024 shares the last bucket
    ],
)
def test_one_size_per_bucket_up_to_the_largest_forward(max_rows: int, chunk: int, sizes: list[int]) -> None:
    assert warmup.warm_m_sizes(max_rows, chunk) == sizes


def _int8_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))
    quantize_model(model, scheme="int8", backend="triton")
    return model


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, float]]:
    calls: list[tuple[int, int, float]] = []
    forward = QuantLinear.forward

    def spy(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        calls.append((self.in_features, x.shape[0], float(x.abs().amax())))
        return forward(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    return calls


def test_every_triton_linear_runs_at_every_size_with_random_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _int8_model()
    calls = _spy(monkeypatch)
    # on the CPU the tuner never times (the interpreter takes the first config): nothing to warm
    assert warmup.warm_up(model, [1, 3], dtype=torch.float32, device=torch.device("cpu")) == 0 and not calls
    monkeypatch.setattr(warmup, "tuning_active", lambda device: True)
    assert warmup.warm_up(model, [1, 3], dtype=torch.float32, device=torch.device("cpu")) == 2
    # twice: the compile pass, then the tuning pass, on the same inputs
    assert [(k, m) for k, m, _ in calls] == [(64, 1), (64, 3), (48, 1), (48, 3)] * 2
    assert calls[:4] == calls[4:]
    assert all(amax > 0 for *_, amax in calls)  # zeros would let any config agree with the first
    calls.clear()
    monkeypatch.setenv(warmup.PRECOMPILE_ENV, "0")  # one pass, under the lock
    assert warmup.warm_up(model, [1, 3], dtype=torch.float32, device=torch.device("cpu")) == 2
    assert [(k, m) for k, m, _ in calls] == [(64, 1), (64, 3), (48, 1), (48, 3)]
    calls.clear()
    monkeypatch.setenv(warmup.ENV, "0")
    assert warmup.warm_up(model, [1], dtype=torch.float32, device=torch.device("cpu")) == 0 and not calls


def test_build_engine_warms_up_at_the_engines_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    from server_shim.options import ServeOptions
    from server_shim.serve import build_engine

    seen: list[tuple[int, list[int]]] = []
    monkeypatch.setattr(
        warmup,
        "warm_up",
        lambda model, sizes, **kw: seen.append((len(warmup.triton_linears(model)), sizes)) or 0,
    )
    opts = ServeOptions(model="tiny-llama", quant="int8", backend="triton", device="cpu", max_batch_size=4)
    engine = build_engine(opts)
    try:
        assert seen == [
            (len(warmup.triton_linears(engine.loaded.model)), warmup.warm_m_sizes(4, engine.prefill_chunk))
        ]
        assert seen[0][0] > 0
    finally:
        engine.close()
    seen.clear()
    engine = build_engine(ServeOptions(model="tiny-llama", device="cpu"))  # not quantized: nothing to tune
    engine.close()
    assert not seen


def test_out_of_memory_at_a_size_drops_it_and_larger_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _int8_model()
    rows_seen: list[int] = []

    def forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        rows_seen.append(x.shape[0])
        if x.shape[0] >= 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(x.shape[0], self.out_features)

    monkeypatch.setattr(QuantLinear, "forward", forward)
    monkeypatch.setattr(warmup, "tuning_active", lambda device: True)
    assert warmup.warm_up(model, [1, 3, 5], dtype=torch.float32, device=torch.device("cpu")) == 2
    # the second linear never tries 3 or 5 again, nor does the tuning pass after the compile pass
    assert rows_seen == [1, 3, 1, 1, 1]


def test_one_warm_up_at_a_time_then_stored_choices_are_reread(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Servers side by side: a warm-up compiles while another holds the tuning lock (its compile
    pass: the tuner precompiling), then waits for the lock to tune, and rereads the stored choices
    once it has it (so it replays what the other one tuned)."""
    import threading
    import time

    from server_shim.quant import tuning

    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(warmup, "tuning_active", lambda device: True)
    model = _int8_model()
    order: list[str] = []
    forward = QuantLinear.forward

    def spy(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        order.append("compile" if tuning.TUNER._precompiling else "forward")
        return forward(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    reload = tuning.TUNER.reload_disk
    monkeypatch.setattr(tuning.TUNER, "reload_disk", lambda: (order.append("reload"), reload())[1])
    held, release = threading.Event(), threading.Event()

    def other_server() -> None:
        with warmup.tuning_lock():
            held.set()
            release.wait(10)
            order.append("other done")

    t = threading.Thread(target=other_server)
    t.start()
    assert held.wait(10)
    worker = threading.Thread(
        target=warmup.warm_up,
        args=(model, [1]),
        kwargs={"dtype": torch.float32, "device": torch.device("cpu")},
    )
    worker.start()
    deadline = time.monotonic() + 60
    while order.count("compile") < 2 and time.monotonic() < deadline:  # the compile pass: no lock
        time.sleep(0.05)
    worker.join(0.5)
    assert worker.is_alive() and order == ["compile", "compile"]  # then waiting for the lock
    release.set()
    t.join(10)
    worker.join(60)
    assert order[2:4] == ["other done", "reload"] and order[4:] == ["forward", "forward"]
    assert (tmp_path / "tune.json.lock").exists()


def test_an_unwritable_cache_does_not_stop_the_warm_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", str(blocker / "tune.json"))  # its folder is a file
    entered = False
    with caplog.at_level("WARNING", logger=warmup.logger.name), warmup.tuning_lock():
        entered = True
    assert entered and "tuning without waiting for other servers" in caplog.text


def test_the_warm_up_bench_says_where_it_cannot_run() -> None:
    """bench/warmup_split.py without a GPU: each mode one line and exit 0. Its per-phase child (a
    template filled with the model's shapes) runs up to its own GPU check, so a broken template
    fails here rather than on the device."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the bench would run")
    for extra in ([], ["--side-by-side"]):
        r = subprocess.run([sys.executable, "bench/warmup_split.py", *extra], cwd=root, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0 and "skipped (no GPU)" in r.stdout, r.stdout + r.stderr
