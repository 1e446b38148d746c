"""Shared fixtures: the tiny seeded models, loaded once per session (they are read-only to tests;
a test that quantizes or mutates a model loads its own copy with `load_model`)."""

from __future__ import annotations

import ast
import os
import threading

# CPython 3.11's ast.parse is not thread-safe: converting the tree to Python objects keeps one
# recursion counter per interpreter, so two threads parsing at once can raise "SystemError: AST
# constructor recursion depth mismatch". A test process has more than one parser: hypothesis reads
# lambdas' source while schemathesis fuzzes the shim (tests/test_fuzz.py), Triton's JIT and
# interpreter parse kernels, in whatever thread runs them. A fresh-clone CI run failed once with
# that SystemError in the fuzz test (POST /tokenize, not reproduced on replay). One lock
# serialises every ast.parse of the process (hypothesis and Triton both call it by that name).
_PARSE_LOCK = threading.RLock()
_unlocked_parse = ast.parse


def _locked_parse(*args, **kwargs):  # type: ignore[no-untyped-def]
    with _PARSE_LOCK:
        return _unlocked_parse(*args, **kwargs)


ast.parse = _locked_parse

# Before anything loads torch: idle OpenMP threads sleep instead of spinning. Two xdist workers,
# their in-process torch and the servers they start share 2 cores in CI; spinning threads that
# lose their core made a server-launching test up to 10x slower (the shim sets this itself; this
# also covers the tests' own torch and third-party engines they start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from server_shim.models import LoadedModel, load_model  # noqa: E402
from server_shim.quant.linear import triton_language_compiled  # noqa: E402 - imports no triton


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A test module that imports triton before setting TRITON_INTERPRET=1 leaves it compiled for
    every interpreter test collected after it: a failure that comes and goes with the order the
    files are collected in (and with xdist's split). Name the module at once instead."""
    if report.nodeid.endswith(".py") and triton_language_compiled():
        raise pytest.UsageError(
            f"{report.nodeid} imported triton compiled: set os.environ['TRITON_INTERPRET'] = '1' before its imports"
        )


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_moe() -> LoadedModel:
    return load_model("tiny-moe", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_llama: LoadedModel):  # noqa: ANN201 - a generator fixture
    """A real Engine over tiny-llama, one per test module (its worker thread is closed after)."""
    from server_shim.engine import Engine

    eng = Engine(tiny_llama)
    yield eng
    eng.close()


@pytest.fixture
def force(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - returns the pinning function
    """pin(cfg): every Triton GEMM of the test runs config `cfg` (tuning.FORCE; None: the tuner's
    own choice again), undone after the test. tuning is imported here, not at the top: the kernel
    tests switch the interpreter on before anything imports triton."""
    from server_shim.quant import tuning

    def pin(cfg: tuning.Cfg | None) -> None:
        monkeypatch.setattr(tuning, "FORCE", cfg)

    return pin
