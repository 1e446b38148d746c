"""Calibration of the quantized schemes on smollm2-135m, in process (issue 4, "Two references").

For every scheme x backend: module-local cosine and norm ratio against FP32 (each module fed the
FP32 model's own input), residual-stream cosine after the last block, teacher-forced top-1
agreement and mean KL(ref || target) over the smoke prompts x 24 greedy tokens -- against FP32
and against the torch golden. Then each fault injected into one module, against the golden.

    .venv/bin/python bench/calibrate.py [--model smollm2-135m] [--tokens 24] [--fault-module NAME]

The Triton backend runs through the interpreter on CPU (~1 s per GEMM), so on CPU it is measured
module-locally on the modules of one layer only; on a GPU it runs end to end like the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.catalog import SLOT_FAULTS, SLOT_TILE_ROWS  # noqa: E402
from server_shim.errors import QuantConfigError  # noqa: E402
from server_shim.models import load_model  # noqa: E402
from server_shim.quant.arch import vendor_supports  # noqa: E402
from server_shim.quant.faults import FAULT_SCHEMES, FAULTS  # noqa: E402
from server_shim.quant.linear import QuantLinear, quantize_model  # noqa: E402

SCHEMES = ("fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4")
BUILTIN = [
    "The capital of France is", "1+2+3=", "def fibonacci(n):", "Water boils at", "Once upon a time",
    "The first ten prime numbers are", "Translate to French: good morning", "The largest planet is",
    "In 1969, humans", "A haiku about the sea:",
]  # fmt: skip


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] right-padded
    mask: torch.Tensor  # [B, T]
    rows: list[tuple[int, int, int]]  # (b, first logits position, n continuation tokens)


@dataclass
class Run:
    logits: torch.Tensor  # [n_positions, vocab] at the continuation positions, fp32
    resid: torch.Tensor  # [n_valid_tokens, hidden] after the last block


def prompts(root: Path) -> list[str]:
    p = root / "prompts" / "smoke.jsonl"
    if p.exists():
        return [json.loads(line)["prompt"] for line in p.read_text().splitlines() if line.strip()]
    return BUILTIN


def greedy_batch(lm, texts: list[str], n_tokens: int) -> Batch:
    seqs, rows = [], []
    for t in texts:
        ids = lm.tokenizer(t, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                    do_sample=False, pad_token_id=lm.eos_token_ids[0])  # fmt: skip
        seqs.append(out[0])
        rows.append((len(seqs) - 1, ids.shape[1] - 1, out.shape[1] - ids.shape[1]))
    t_max = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t_max), lm.eos_token_ids[0], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
    return Batch(ids, mask, rows)


def forward(model, batch: Batch, capture: dict[str, torch.Tensor] | None = None, n_capture: int = 3) -> Run:
    """One batched teacher-forced pass; optionally captures every linear's input (first rows)."""
    hooks, resid = [], {}
    last = model.model.layers[-1]
    hooks.append(
        last.register_forward_hook(
            lambda m, i, o: resid.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
    )
    if capture is not None:
        valid = batch.mask[:n_capture].bool()
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":

                def hook(m, i, o, name=name):  # noqa: ANN001
                    capture[name] = i[0][:n_capture][valid].detach().clone()

                hooks.append(mod.register_forward_hook(hook))  # fmt: skip
    try:
        with torch.inference_mode():
            h = model.model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
            pos = torch.cat(
                [torch.stack([torch.full((n,), b), torch.arange(p, p + n)], 1) for b, p, n in batch.rows]
            )
            logits = model.lm_head(h[pos[:, 0], pos[:, 1]]).float()
    finally:
        for hk in hooks:
            hk.remove()
    return Run(logits, resid["h"][batch.mask.bool()].float())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def tf_metrics(ref: Run, tgt: Run) -> dict[str, float]:
    lp, lq = torch.log_softmax(ref.logits.double(), -1), torch.log_softmax(tgt.logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    tok_cos = torch.nn.functional.cosine_similarity(ref.resid.double(), tgt.resid.double(), -1)
    return {
        "top1": (ref.logits.argmax(-1) == tgt.logits.argmax(-1)).double().mean().item(),
        "kl": kl.mean().item(), "resid_cos": tok_cos.mean().item(),
    }  # fmt: skip


def local_metrics(
    model, ref_model, inputs: dict[str, torch.Tensor], names=None, backend=None
) -> dict[str, float]:
    """Module-local cosine and norm ratio of each quantized module against `ref_model`'s module."""
    cos, ratio = [], []
    with torch.inference_mode():
        for name in names or inputs:
            mod, ref = model.get_submodule(name), ref_model.get_submodule(name)
            if not isinstance(mod, QuantLinear):
                continue
            x = inputs[name]
            y = mod.forward_with_backend(x, backend) if backend else mod(x)
            r = ref.forward_with_backend(x, "torch") if isinstance(ref, QuantLinear) else ref(x)
            cos.append(_cos(y, r))
            ratio.append((y.double().norm() / r.double().norm()).item())
    if not cos:
        return {}
    far = max(ratio, key=lambda v: abs(v - 1.0))
    return {"cos_min": min(cos), "cos_med": statistics.median(cos), "ratio_med": statistics.median(ratio),
            "ratio_far": far}  # fmt: skip


def quantized(base, scheme: str, backend: str, faults=()):
    m = copy.deepcopy(base)
    quantize_model(m, scheme=scheme, backend=backend, faults=list(faults))
    return m


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def row(label: str, loc: dict, vs_fp: dict | None, vs_gold: dict | None, loc_gold: dict | None) -> str:
    g = vs_gold or {}
    f = vs_fp or {}
    return (f"| {label} | {fmt(loc.get('cos_min'), '.5f')} / {fmt(loc.get('cos_med'), '.5f')} | "
            f"{fmt(loc.get('ratio_med'), '.4f')} ({fmt(loc.get('ratio_far'), '.3f')}) | {fmt(f.get('resid_cos'), '.5f')} | "
            f"{fmt(f.get('top1', None) and 100 * f['top1'], '.1f')} | {fmt(f.get('kl'), '.4f')} | "
            f"{fmt((loc_gold or {}).get('cos_min'), '.6f')} | {fmt(g.get('top1', None) and 100 * g['top1'], '.1f')} | "
            f"{fmt(g.get('kl'), '.2e')} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--fault-module", default="model.layers.17.mlp.down_proj")
    ap.add_argument("--triton-layer", type=int, default=17)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--no-faults", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    lm = load_model(args.model, dtype="float32", device="cpu")
    base = lm.model
    batch = greedy_batch(lm, prompts(Path(__file__).resolve().parents[1]), args.tokens)
    inputs: dict[str, torch.Tensor] = {}
    ref = forward(base, batch, capture=inputs)
    n_pos = ref.logits.shape[0]
    print(f"# calibration: {args.model}, {len(batch.rows)} prompts, {n_pos} teacher-forced positions, "
          f"{len(inputs)} linears (setup {time.time() - t0:.0f} s)\n")  # fmt: skip
    print("| target | local cos min / med vs FP32 | norm ratio med (farthest) | resid cos | top-1 % | KL | "
          "local cos min vs golden | top-1 % vs golden | KL vs golden |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    goldens = {}
    for scheme in args.schemes.split(","):
        gold = quantized(base, scheme, "torch")
        goldens[scheme] = gold
        g_run = forward(gold, batch)
        print(
            row(
                f"{scheme} torch (golden)",
                local_metrics(gold, base, inputs),
                tf_metrics(ref, g_run),
                None,
                None,
            ),
            flush=True,
        )
        if vendor_supports(scheme, "cpu")[0]:
            ven = quantized(base, scheme, "vendor")
            v_run = forward(ven, batch)
            print(row(f"{scheme} vendor", local_metrics(ven, base, inputs), tf_metrics(ref, v_run),
                      tf_metrics(g_run, v_run), local_metrics(ven, gold, inputs)), flush=True)  # fmt: skip
            del ven
        names = [n for n in inputs if n.startswith(f"model.layers.{args.triton_layer}.")]
        t = time.time()
        try:
            loc_t = local_metrics(gold, base, inputs, names, backend="triton")
            loc_tg = local_metrics(gold, gold, inputs, names, backend="triton")
        except QuantConfigError as e:
            print(f"| {scheme} triton | {e} |")
            continue
        print(
            row(
                f"{scheme} triton (layer {args.triton_layer} only, {time.time() - t:.0f} s)",
                loc_t,
                None,
                None,
                loc_tg,
            ),
            flush=True,
        )
        if scheme != "fp8-block":
            del goldens[scheme]
    if args.no_faults or "fp8-block" not in goldens:
        return 0
    gold = goldens["fp8-block"]
    g_run = forward(gold, batch)
    print(f"\n## fp8-block + one fault in `{args.fault_module}`, against the golden (and FP32)\n")
    print(
        "| fault | local cos vs golden | local norm ratio | top-1 % vs golden | KL vs golden | top-1 % vs FP32 | KL vs FP32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for fault in FAULTS:
        if "fp8-block" not in FAULT_SCHEMES[fault] or fault == "routed-scaling-missing":
            continue
        bad = quantized(base, "fp8-block", "torch", [f"{fault}@{args.fault_module}"])
        x = inputs[args.fault_module]
        with torch.inference_mode():
            if fault in SLOT_FAULTS:  # the input as requests: the last slot is measured
                slots = 2 if fault == "slot-variant" else SLOT_TILE_ROWS + 1  # slot-tile: past the first tile
                xs = torch.stack([x.flip(0) if i == slots - 1 else x for i in range(slots)])
                y = bad.get_submodule(args.fault_module)(xs)[-1]
                r = gold.get_submodule(args.fault_module)(xs)[-1]
            else:
                y, r = bad.get_submodule(args.fault_module)(x), gold.get_submodule(args.fault_module)(x)
        b_run = forward(bad, batch)
        vg, vf = tf_metrics(g_run, b_run), tf_metrics(ref, b_run)
        print(f"| {fault} | {_cos(y, r):.5f} | {(y.norm() / r.norm()).item():.4f} | {100 * vg['top1']:.1f} | "
              f"{vg['kl']:.4f} | {100 * vf['top1']:.1f} | {vf['kl']:.4f} |", flush=True)  # fmt: skip
        del bad
    print(f"\n(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
