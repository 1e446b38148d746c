"""Count the kernels one engine decode step launches, per decoder layer, plain vs fused (CPU).

    TRITON_INTERPRET=1 python bench/decode_ops.py [--model tiny-llama] [--rows 1] [--out ops.json]

Launches are counted as the aten ops that run a kernel on a GPU (views, reshapes, allocations and
casts to the dtype a tensor already has are free and not counted; a copy, a fill, an index are) plus one per Triton kernel of the fused
path (fused_kernels.py; the torch ops Triton's interpreter runs inside them are not counted). Ops
are attributed to a decoder layer between its forward pre- and post-hooks; the rest (embedding,
final norm, lm_head, log-softmax and top-k) are "outside". The plain, fused without rotary
(DIFFTEST_FUSED_ROPE=0) and fully fused engines are counted on the same decode step. CPU counts
are the GPU eager step's launches in kind and number (the same aten ops dispatch on either device);
a captured CUDA graph replays the same kernels with no launch overhead of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path runs on the CPU only interpreted
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from server_shim import fused_decode, fused_kernels  # noqa: E402
from server_shim.engine import Engine, SamplingParams  # noqa: E402
from server_shim.models import load_model  # noqa: E402

FREE = {  # aten ops that launch no kernel: views, metadata, allocation
    "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "split", "split_with_sizes", "as_strided", "alias", "detach", "empty", "empty_like",
    "empty_strided", "lift_fresh", "unbind", "chunk", "narrow", "contiguous", "_reshape_alias", "sym_size",
    "sym_stride", "is_same_size", "dim", "size", "stride", "result_type",
}  # fmt: skip
TRITON = ("decode_attention", "rms_norm", "rotary")


class Counter(TorchDispatchMode):
    """Counts kernel-launching aten ops by region ("layer" inside a decoder layer, else "outside")."""

    def __init__(self) -> None:
        super().__init__()
        self.region = "outside"
        self.paused = False
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        same = name in ("to", "_to_copy", "clone") and args and out is args[0]  # a no-op cast
        if not self.paused and not same and name not in FREE:
            self.ops[self.region][name] += 1
        return out


def count_step(eng: Engine, rows: int, kv_len: int) -> dict:
    runner = eng.runner
    counter = Counter()
    layers = list(runner.base.layers)
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda *a: setattr(counter, "region", "layer")))
        hooks.append(layer.register_forward_hook(lambda *a: setattr(counter, "region", "outside")))
    originals = {n: getattr(fused_kernels, n) for n in TRITON}

    def wrap(name: str):  # noqa: ANN202
        def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
            counter.ops[counter.region]["triton:" + name] += 1
            counter.paused = True
            try:
                return originals[name](*a, **k)
            finally:
                counter.paused = False

        return run

    try:
        for n in TRITON:
            setattr(fused_kernels, n, wrap(n))
        with torch.inference_mode(), counter:
            runner._decode_body(rows, kv_len)
    finally:
        for n, fn in originals.items():
            setattr(fused_kernels, n, fn)
        for h in hooks:
            h.remove()
    per_layer = sum(counter.ops["layer"].values()) / len(layers)
    return {
        "per_layer": per_layer,
        "outside": sum(counter.ops["outside"].values()),
        "layer_ops": {k: v / len(layers) for k, v in sorted(counter.ops["layer"].items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--dtype", default="float16", help="the GPU's dtype by default: its casts count")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    result: dict = {"model": args.model, "rows": args.rows, "dtype": args.dtype}
    for mode in ("plain", "fused, HF rotary", "fused"):
        if mode == "fused, HF rotary":
            os.environ[fused_decode.ROPE_ENV] = "0"
        else:
            os.environ.pop(fused_decode.ROPE_ENV, None)
        eng = Engine(loaded, fused_decode=mode != "plain")
        try:

            async def go(eng: Engine = eng) -> None:
                hs = [
                    eng.submit([[1, 5, 9 + i]], SamplingParams(max_tokens=3, ignore_eos=True))
                    for i in range(args.rows)
                ]
                for h in hs:
                    async for _ in h.events():
                        pass

            asyncio.run(go())  # a prefill and decode steps: the cache holds rows, the runner its inputs
            result[mode] = count_step(eng, args.rows, 16)
        finally:
            eng.close()
            fused_decode.uninstall(loaded.model)
    print(f"{args.model} {args.dtype}, one decode step of {args.rows} row(s): kernel launches")
    print(f"{'':18} {'per layer':>9} {'outside layers':>14}")
    for mode in ("plain", "fused, HF rotary", "fused"):
        r = result[mode]
        print(f"{mode:18} {r['per_layer']:>9.1f} {r['outside']:>14}")
    for mode in ("plain", "fused"):
        print(f"{mode} per layer: " + ", ".join(f"{k} {v:g}" for k, v in result[mode]["layer_ops"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
