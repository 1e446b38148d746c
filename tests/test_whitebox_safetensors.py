"""difftest.whitebox.safetensors: lookup-table decoders (hand values, and all 256 codes against torch) and the
torch-free safetensors reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from difftest.errors import UnreadableBody
from difftest.whitebox.safetensors import (
    E2M1,
    decode,
    read_safetensors,
    unpack_nibbles,
    write_safetensors,
)


@pytest.mark.parametrize(
    ("fmt", "code", "value"),
    [
        ("e4m3fn", 0x7E, 448.0),  # max: 1.75 * 2**8
        ("e4m3fn", 0x38, 1.0),  # exponent 7 = bias
        ("e4m3fn", 0xB8, -1.0),
        ("e4m3fn", 0x01, 2.0**-9),  # smallest subnormal: 1/8 * 2**-6
        ("e4m3fn", 0x80, -0.0),
        ("e4m3fnuz", 0x7F, 240.0),  # max: 1.875 * 2**7
        ("e4m3fnuz", 0x38, 0.5),  # same bits, half the e4m3fn value
        ("e4m3fnuz", 0x40, 1.0),
        ("e8m0", 127, 1.0),
        ("e8m0", 128, 2.0),
        ("e8m0", 0, 2.0**-127),
        ("e2m1", 0x7, 6.0),
        ("e2m1", 0xF, -6.0),
        ("e2m1", 0x3, 1.5),
    ],
)
def test_hand_values(fmt: str, code: int, value: float) -> None:
    got = float(decode(np.array([code], np.uint8), fmt)[0])
    assert got == value and math.copysign(1, got) == math.copysign(1, value)


@pytest.mark.parametrize(
    ("fmt", "code"), [("e4m3fnuz", 0x80), ("e4m3fn", 0x7F), ("e4m3fn", 0xFF), ("e8m0", 255)]
)
def test_nan_codes(fmt: str, code: int) -> None:
    assert math.isnan(decode(np.array([code], np.uint8), fmt)[0])


def test_e2m1_grid_is_the_ocp_grid() -> None:
    assert E2M1[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert (E2M1[8:] == -E2M1[:8]).all()


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("e4m3fn", torch.float8_e4m3fn), ("e4m3fnuz", torch.float8_e4m3fnuz)]
)
def test_every_fp8_code_matches_torch(fmt: str, dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dtype).float().numpy()
    got = decode(codes.numpy(), fmt)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_unpack_nibbles_low_nibble_first() -> None:
    assert unpack_nibbles(np.array([[0x21, 0x0F]], np.uint8), 3).tolist() == [[1, 2, 15]]


def test_reader_keeps_fp8_codes_and_widens_bf16() -> None:
    w = torch.tensor([[1.0, -2.0], [448.0, 0.0]]).to(torch.float8_e4m3fn)
    body = st_save(
        {
            "w": w,
            "b": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
            "i": torch.tensor([7, -1]),
            "f": torch.ones(2, 3),
        },
        metadata={"module": "m"},
    )
    st = read_safetensors(body)
    assert st.metadata == {"module": "m"}
    assert st.dtypes["w"] == "F8_E4M3" and st.tensors["w"].dtype == np.uint8
    assert st.tensors["w"].tolist() == w.view(torch.uint8).tolist()
    assert st.value("w").tolist() == [[1.0, -2.0], [448.0, 0.0]]
    assert st.value("b").tolist() == [1.5, -3.0] and st.value("b").dtype == np.float32
    assert st.value("i").tolist() == [7, -1] and st.value("f").shape == (2, 3)


def test_reader_round_trips_the_writer_and_rejects_garbage() -> None:
    st = read_safetensors(write_safetensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": "v"}))
    assert st.value("x").tolist() == [[0, 1, 2], [3, 4, 5]] and st.metadata == {"k": "v"}
    with pytest.raises(UnreadableBody):
        read_safetensors(b"\x01\x02")


def _body(header: object, data: bytes = b"") -> bytes:
    import json
    import struct

    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (_body([1, 2]), "header is not a JSON object"),
        (_body({"x": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed safetensors entry"),
        (
            _body({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
            "do not hold a F32",
        ),
        (_body({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8), "malformed"),
        (_body({"x": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed"),
    ],
    ids=["header-list", "no-dtype", "truncated", "offsets-past-body", "shape-strings"],
)
def test_a_damaged_body_is_unreadable_naming_why_never_a_traceback(body: bytes, said: str) -> None:
    """The bugs: a header that is a list, an entry without dtype, a body cut short were a
    TypeError, KeyError or reshape ValueError deep inside a layer diff (exit 1, a traceback)."""
    from difftest.errors import UnreadableBody
    from difftest.whitebox.safetensors import read_safetensors

    with pytest.raises(UnreadableBody, match=said):
        read_safetensors(body)


def test_a_missing_tensor_is_unreadable_naming_it() -> None:
    from difftest.errors import UnreadableBody
    from difftest.whitebox.safetensors import read_safetensors

    st = read_safetensors(_body({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(UnreadableBody, match="no tensor 'output' \\(it has: x\\)"):
        st.value("output")
