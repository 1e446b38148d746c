"""What the shim's slot-invariant CPU attention costs (server_shim/row_attention.py), in the same run.

Two figures, each with batched SDPA as the baseline beside it:
- one layer's attention alone at decode shapes (smollm2's 9 query / 3 key-value heads of 64): the
  matmul path the engine's masks take, and SDPA a row at a time, what other masks take;
- the shim's engine end to end: greedy tokens/s at batch 1 / 8 / 32 (bench/serve.py's prompts and
  timing), the one engine switched between the two paths on its model between timed runs,
  alternated, the median of `--reps` runs each.

Also whether batched SDPA gives identical rows identical numbers on this machine at this thread
count: where it does not, row_attention is what keeps the shim batch-slot invariant.

    python bench/row_attention.py [--model smollm2-135m] [--tokens 32] [--batches 1,8,32] [--reps 3]
                                  [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import bench_engine, prompts  # noqa: E402

from server_shim import row_attention  # noqa: E402
from server_shim.engine import Engine  # noqa: E402
from server_shim.models import load_model  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = HEADS // KV_HEADS


def _attention_us(rows: int, positions: int, path: str, reps: int = 200) -> float:
    """One decode step's attention: batched SDPA, the matmul path (the engine's boolean mask), or
    SDPA a row at a time (what any other mask gets: here the same mask, additive)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, HEADS, 1, DIM, generator=g)
    k, v = (torch.randn(rows, KV_HEADS, positions, DIM, generator=g) for _ in range(2))
    mask = (torch.arange(positions) < positions - 3).view(1, 1, 1, positions).expand(rows, 1, 1, positions)
    if path == "rows":
        mask = torch.where(mask, 0.0, float("-inf"))
    fn = sdpa_attention_forward if path == "batched" else row_attention.attention
    fn(_Attn(), q, k, v, mask)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(_Attn(), q, k, v, mask)
    return (time.perf_counter() - t0) / reps * 1e6


def _batched_rows_agree(rows: int = 4, positions: int = 96) -> float:
    """Largest difference between identical rows under batched SDPA (0.0: slot invariant here)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, HEADS, 1, DIM, generator=g).expand(rows, -1, -1, -1).contiguous()
    k, v = (
        torch.randn(1, KV_HEADS, positions, DIM, generator=g).expand(rows, -1, -1, -1).contiguous()
        for _ in range(2)
    )
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return max((out[r] - out[0]).abs().max().item() for r in range(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per path and batch (median)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out: dict = {"threads": torch.get_num_threads(), "batched_identical_rows_max_diff": _batched_rows_agree()}
    print(f"torch {torch.__version__}, {out['threads']} threads; batched SDPA, identical rows: "
          f"max difference {out['batched_identical_rows_max_diff']:.3g} (0: slot invariant here)")  # fmt: skip
    print(
        f"{'attention':>22}  {'batched us':>10}  {'matmul us':>9}  {'/batched':>8}  {'rows us':>8}  {'/batched':>8}"
    )
    out["attention"] = []
    for rows, positions in ((4, 64), (8, 256), (32, 512)):
        b, m, r = (_attention_us(rows, positions, path) for path in ("batched", "matmul", "rows"))
        out["attention"].append(
            {"rows": rows, "positions": positions, "batched_us": b, "matmul_us": m, "rows_us": r}
        )
        print(
            f"{f'{rows} rows x {positions} pos':>22}  {b:>10.1f}  {m:>9.1f}  {m / b:>8.2f}  {r:>8.1f}  {r / b:>8.2f}"
        )
    loaded = load_model(args.model, dtype="float32", device="cpu")
    engine = Engine(loaded, max_batch_size=max(int(b) for b in args.batches.split(",")))
    print(f"{'engine batch':>22}  {'batched tok/s':>13}  {'ours tok/s':>10}  {'ours/batched':>12}")
    out["engine"] = []
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            texts = prompts(batch)
            runs: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.reps):  # alternated: a machine's drift lands on both alike
                for on in (False, True):
                    (row_attention.install if on else row_attention.uninstall)(loaded.model)
                    runs[on].append(bench_engine(engine, texts, args.tokens, None)["tok_s"])
            batched, ours = statistics.median(runs[False]), statistics.median(runs[True])
            out["engine"].append({"batch": batch, "batched_tok_s": batched, "ours_tok_s": ours})
            print(f"{batch:>22}  {batched:>13.1f}  {ours:>10.1f}  {ours / batched:>12.2f}")
    finally:
        engine.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
