"""server_shim.option_rules' value rules: one set, run by difftest's config check and by the shim
itself before it loads a model (was: only at load, in models.py / twin.py, after a minute)."""

from __future__ import annotations

import pytest

from server_shim import options
from server_shim.errors import ShimError
from server_shim.option_rules import (
    DTYPE_NAMES,
    OptionValueError,
    device_problem,
    dtype_problem,
    refuse_bad_values,
    rounding_noise_amplitude,
)

DTYPES = ["auto", *DTYPE_NAMES, "float64", "fp8", "Float32", ""]
DEVICES = [
    "auto",
    "cpu",
    "cuda",
    "cuda:0",
    "cuda:12",
    "gpu",
    "cuda:01",
    "cuda:-1",
    "CUDA",
    "cpu:0",
    "mps",
    "",
]


@pytest.mark.parametrize(
    ("device", "ok"),
    [(d, d in ("auto", "cpu", "cuda", "cuda:0", "cuda:12")) for d in DEVICES],
)
def test_device_spelling(device: str, ok: bool) -> None:
    assert (device_problem(device) is None) is ok


@pytest.mark.parametrize(
    ("text", "amplitude"),
    [("auto", None), ("", 0.0), ("0", 0.0), ("0.001", 1e-3), (" 0.5 ", 0.5)],
)
def test_rounding_noise_amplitude(text: str, amplitude: float | None) -> None:
    assert rounding_noise_amplitude(text) == amplitude


@pytest.mark.parametrize("text", ["autoo", "1", "1.5", "-0.1", "nan", "inf", "x"])
def test_rounding_noise_out_of_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"--rounding-noise must be 'auto' or a number in \[0, 1\)"):
        rounding_noise_amplitude(text)


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"device": "gpu"}, "device"),
        ({"rounding_noise": "autoo"}, "rounding_noise"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_refuse_bad_values_names_the_option(change: dict[str, object], option: str) -> None:
    with pytest.raises(OptionValueError) as info:
        refuse_bad_values(options.ServeOptions(model="tiny-llama", **change))
    assert info.value.option == option and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_shim_loads_every_dtype_the_rule_accepts_and_no_other(dtype: str) -> None:
    """The rule and models.resolve_dtype cannot drift: the loader maps exactly the names it lets by."""
    torch = pytest.importorskip("torch")
    from server_shim.errors import ModelLoadError
    from server_shim.models import resolve_dtype

    if dtype_problem(dtype) is None:
        assert isinstance(resolve_dtype(dtype, torch.device("cpu")), torch.dtype)
    else:
        with pytest.raises(ModelLoadError, match=f"unknown dtype {dtype!r}"):
            resolve_dtype(dtype, torch.device("cpu"))


@pytest.mark.parametrize("device", [d for d in DEVICES if not d.startswith("cuda")])
def test_the_shim_takes_every_cpu_device_the_rule_accepts_and_no_other(device: str) -> None:
    torch = pytest.importorskip("torch")
    from server_shim.errors import ModelLoadError
    from server_shim.models import resolve_device

    if device_problem(device) is None:
        assert isinstance(resolve_device(device), torch.device)
    else:
        with pytest.raises(ModelLoadError, match=f"unknown device {device!r}"):
            resolve_device(device)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--rounding-noise", "autoo"], "--rounding-noise must be 'auto' or a number in [0, 1), got 'autoo'"),
        (["--dtype", "float64"], "unknown dtype 'float64': use auto, float32, bfloat16 or float16"),
        (["--device", "gpu"], "unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
    ],
)
def test_serve_by_hand_refuses_a_bad_value_before_it_loads_anything(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the model loaded (and the rounding twin's check ran after it), then exit 2."""
    from server_shim import __main__ as shim_main
    from server_shim import serve

    served: list[object] = []
    monkeypatch.setattr(serve, "run_server", served.append)
    assert shim_main.main(["serve", "--model", "tiny-llama", "--port", "0", *flags]) == 2
    assert capsys.readouterr().err == f"server_shim: error: {said}\n"
    assert served == []


def test_build_engine_refuses_a_bad_value_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests and tools build engines without the CLI: the same rules stop them before load_model."""
    pytest.importorskip("torch")
    from server_shim import models, serve

    loaded: list[str] = []
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: loaded.append(spec))
    opts = options.ServeOptions(model="tiny-llama", rounding_noise="autoo")
    with pytest.raises(ShimError, match="--rounding-noise must be 'auto'"):
        serve.build_engine(opts)
    assert loaded == []
