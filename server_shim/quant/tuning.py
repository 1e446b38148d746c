"""Per-shape kernel configs for the fast Triton kernels: short candidate lists, timed once, cached.

One config per key = (arch family, kernel, variant, M bucket, N, K). The first call with a new key
times every candidate (CUDA-graph replays, see `_time`; a few ms each, plus one compile per tile),
keeps the fastest, and every later call with that key reuses it: no timing, no host sync, nothing
that depends on allocations -- so a CUDA graph engine that warms each shape up eagerly before
capture replays exactly what it warmed. Inside a stream capture an unseen key never tunes (that
would sync a capturing stream): it takes the list's first, heuristic config, uncached, and warns.
M buckets (1, 16, 32, 64, 256, 1024, 4096+) keep the choice stable within a bucket.

Candidates timed within 3% of the fastest are timed again, interleaved, and the median decides:
one short timing cannot order a near-tie, and a wrong order there had cost 4% on an H200.

Each candidate's output is checked against the first candidate's before it may win: a config
whose numbers disagree (a wrong tile or split path on some GPU) is rejected loudly (logged as an
error and listed in `REJECTED`, which bench/gemm.py prints as a FAIL row), never served.

Why only a few configs: each distinct tile shape is one Triton compile (~1 s), paid at the first
call. The lists are the shapes known to work on each family: for Hopper the Triton matmul
tutorials' fp8 / fp16 tiles (128x256x128 with 8 warps, 3 stages; 64x128x128 with 4 warps as
vLLM's block-fp8 configs favour, several CTAs per SM overlapping one another's scaling), and
split-K / narrow-N tiles for M <= 16 and the dot-free GEMV kernels for M = 1, where HBM bandwidth
is all that counts (timed as CUDA-graph replays, see `_time`: eager timing would measure launches).

The choices persist on disk, in `triton-tune.json` under the model cache (DIFFTEST_CACHE_DIR,
else ~/.cache/difftest/models): tuning the 64 keys of one small model's five schemes took 2 min on
an H200 (the 4-bit lists are long), which every server start would pay again at its first
requests. Entries are keyed by device name, Triton version and a hash of the kernel sources, and
a stored name that is not among the key's current candidates is retuned, not trusted -- so a
kernel change or another GPU never replays a stale choice. DIFFTEST_TRITON_TUNE_CACHE=path.json
puts the file elsewhere (the other half of an A/A pair then replays the same configs);
DIFFTEST_TRITON_TUNE_CACHE=0 keeps the choices in memory only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cfg:
    """path "tile": one kernel (split-K when split > 1, then a reduction pass); "deq": dequantize the
    4-bit weight to x's dtype, then a plain 16-bit GEMM (bm, bn, bk are that GEMM's tiles); "deqb":
    the same dequantization (a fresh buffer per call), then torch.mm -- cuBLAS / hipBLAS, which
    beats a Triton 16-bit GEMM at large M (bn, bk, warps: the dequantization's tiles; "deq" where
    out's or bias's dtype is not x's, or fp32 x would run as TF32);
    "fused": 4-bit weights unpacked in registers, interleaved and fed to one dot per K tile against
    K-contiguous x (w4a16); "gemv": the tl.dot-free M = 1 kernels (bm is 1: a row per program);
    "gemvg": the 4-bit one on group-shaped tiles (`_gemv4g_kernel`; bk rounded up to the group,
    "gemv" for a group that is not a power of two up to 256); "gemvw": the same on int32 words of
    8 nibbles (`_gemv4w_kernel`; "gemvg" where K % 8 or the word view does not fit);
    "gemvx": "gemvw" with x read once per K step as whole words' 8 k and split into the nibble planes
    in registers; "gemvr": one weight row per program, words and x planes in one register layout;
    "gemvf": "gemvr" factored -- the exact dequantized weight times x in fp32, the group's scale
    once per word, two nibbles per integer op; bn 2: two rows per program sharing x's planes (all
    three "gemvg" where the word view does not fit); "words": "fused" on int32 words, each nibble
    dequantized where it lies in its word (`_wonly_words_kernel`; "fused" where the word view or the
    K tile does not fit); "wordsb": "words" with a K step per warp, num_warps steps side by side as one batched dot
    (`_wonly_wordsb_kernel`), its splits reducing themselves as "wordsk"'s; "wordsg": "wordsb"'s
    sums (16 rows, K steps of 128, no split) in the Gluon kernel of quant/_gluon_w4.py, both MMA
    operands loaded straight into registers ("wordsb" where it cannot run); "wordsq": "wordsg" with
    k's order permuted alike in both operands so that they sit in their registers as loaded (a
    thread's 4 words of a row one 16-byte load, an mxfp4 group; x's MMA operand pairs without moves)
    and two K steps a loop step, stages 1 or 2: operands loaded that many K steps ahead (16 rows,
    4 warps; "wordsb" where it cannot run);
    "fusedk" / "wordsk" / "tilek": "fused" / "words" / "tile" whose
    K splits reduce themselves (the last split to finish sums the partials in split order on a
    per-tile counter) instead of a second kernel (the 8-bit "tile" / "lag" splits always do); "lag": the fp8 tile with each K step's promoted
    partial added one step late (8-bit GEMM; int8 and fast-accumulation fp8 never see it); "tma": the
    8-bit tile with its operands read through tensor descriptors (Hopper's bulk tensor copies; no
    split; only where the operands are 16-byte aligned native 8-bit, else it runs as "tile"); "tmap":
    "tma" as a persistent grid (a program per multiprocessor) storing its tiles by descriptor too
    ("tma" where out's rows are not 16-byte aligned); "wsp": the warp-specialized Gluon kernel of
    quant/_gluon_mm8.py (fp8 with exact accumulation on sm90; 128 rows, 128 or 256 columns, K steps of
    128, 4 warps per consumer; "tmap" where it cannot run); "quant2": for a one-token 8-bit GEMM whose
    activation can be quantized inside the GEMV, the act-quant kernel and the GEMM instead."""

    path: str
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1
    group_m: int = 8  # tile-order swizzle of the dot kernels (programs per column group)

    def __post_init__(self) -> None:
        # the dispatch would run an unknown path as its default kernel: a pinned or typed name must not
        if self.path not in PATHS:
            raise ValueError(f"unknown triton config path {self.path!r} (known: {' '.join(sorted(PATHS))})")
        # the Gluon word kernels' fixed tiles: another size in a pinned name would be run as these
        fixed = {"wordsg": (16, self.bn, 128), "wordsq": (16, 16, 128)}.get(self.path)
        if fixed is not None and (self.bm, self.bn, self.bk) != fixed:
            raise ValueError(f"{self.path} tiles are {'x'.join(map(str, fixed))} (BMxBNxBK), not "
                             f"{self.bm}x{self.bn}x{self.bk}")  # fmt: skip
        if self.path == "wordsq" and self.stages not in (1, 2):  # its operands 1 or 2 K steps ahead
            raise ValueError(f"wordsq loads its operands 1 or 2 K steps ahead (s1, s2), not s{self.stages}")

    @property
    def name(self) -> str:
        g = f":g{self.group_m}" if self.group_m != 8 else ""
        return f"{self.path}:{self.bm}x{self.bn}x{self.bk}:w{self.warps}:s{self.stages}:k{self.split}{g}"

    @property
    def k_steps(self) -> int:
        """K tiles the kernel runs side by side in one loop step: "wordsb" / "wordsg" one per warp (their
        SUB), else 1."""
        return self.warps if self.path in ("wordsb", "wordsg") else 1

    @classmethod
    def parse(cls, name: str) -> Cfg:
        """A config from its name (`Cfg.name`); ValueError for anything else."""
        try:
            path, tiles, w, s, k, *g = name.split(":")
        except ValueError:
            raise ValueError(f"not a triton config name: {name!r} (path:BMxBNxBK:wW:sS:kK[:gG])") from None
        bm, bn, bk = (int(v) for v in tiles.split("x"))
        return cls(path, bm, bn, bk, int(w[1:]), int(s[1:]), int(k[1:]), int(g[0][1:]) if g else 8)


PATHS = frozenset(("tile", "tilek", "lag", "tma", "tmap", "deq", "deqb", "fused", "fusedk", "words", "wordsk",
                   "wordsb", "gemv", "gemvg", "gemvw", "gemvx", "gemvr", "gemvf", "quant2", "wsp", "wordsg", "wordsq"))  # fmt: skip

M_BUCKETS = (1, 16, 32, 64, 256, 1024)  # then 4096: every larger M


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return 4096


def _t(path: str, *rows: tuple[int, ...]) -> list[Cfg]:
    return [Cfg(path, *r) for r in rows]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, split[, group_m]]); the first entry of each list is
# the default. "gemv" lists are added for M = 1 (bucket 1) only: 8..32 weight rows per program, 256+
# programs at N = 4096, wide K vectors (BLOCK_K bytes per row and step for 8-bit, BLOCK_K/2 for 4-bit).
_GEMV = {  # HBM wants ~4 MB in flight: 1000+ programs of 2-8 KB tiles (plus one prefetched), or split-K
    "mm8": _t("gemv", (1, 16, 256, 4, 1, 4), (1, 8, 256, 4, 1, 4), (1, 4, 512, 4, 1), (1, 8, 512, 4, 1),
              (1, 16, 256, 4, 1, 2), (1, 32, 256, 8, 1, 4), (1, 8, 512, 4, 1, 2)),
    "wonly": _t("gemvw", (1, 8, 1024, 4, 1), (1, 16, 1024, 4, 1), (1, 8, 2048, 4, 1), (1, 4, 2048, 4, 1))
    + _t("gemvx", (1, 8, 1024, 4, 1), (1, 4, 1024, 4, 1), (1, 8, 512, 4, 1), (1, 16, 512, 4, 1), (1, 4, 2048, 4, 1),
         (1, 8, 1024, 8, 1), (1, 2, 2048, 4, 1), (1, 8, 512, 4, 1, 2))
    + _t("gemvf", (1, 1, 4096, 2, 1), (1, 1, 2048, 2, 1), (1, 1, 1024, 2, 1), (1, 1, 4096, 4, 1), (1, 1, 2048, 4, 1),
         (1, 1, 1024, 1, 1), (1, 2, 1024, 1, 1), (1, 2, 2048, 2, 1), (1, 2, 1024, 2, 1))
    + _t("gemvr", (1, 1, 4096, 4, 1), (1, 1, 4096, 2, 1), (1, 1, 2048, 2, 1), (1, 1, 2048, 4, 1), (1, 1, 1024, 1, 1),
         (1, 1, 4096, 8, 1), (1, 1, 8192, 4, 1), (1, 1, 1024, 2, 1))
    + _t("gemvg", (1, 8, 1024, 4, 1), (1, 16, 512, 4, 1), (1, 8, 512, 4, 1, 2), (1, 4, 1024, 4, 1))
    + _t("gemv", (1, 8, 512, 4, 1, 4), (1, 16, 512, 8, 1, 2), (1, 8, 1024, 8, 1, 2), (1, 4, 1024, 4, 1),
                (1, 8, 512, 4, 1, 2), (1, 16, 256, 4, 1, 4), (1, 32, 512, 8, 1, 4)),
}  # fmt: skip
# whole words, one dequantization per BLOCK_M rows: on an H200 (2026-12-04) 1.4-2.4x faster than the best
# config before them at M = 32, 64, 128, 256 (int4-g128 and mxfp4, N = K = 4096); Hopper's 4-bit mid and
# mid32 lists both hold them
_HOPPER_MID_WORDS = _t("wordsk", (32, 64, 128, 4, 4, 4), (32, 64, 128, 4, 3, 2), (64, 64, 128, 4, 3, 4),
                       (64, 64, 128, 4, 3, 2), (128, 64, 128, 8, 3, 2), (128, 64, 128, 8, 3, 4),
                       (128, 128, 128, 8, 3, 2)) + _t("words", (64, 64, 128, 4, 3))  # fmt: skip
_HOPPER = {
    "mm8": {
        # M <= 16 is a read of the weight: the lists span 64 .. 1024 programs at N = K = 4096
        "small": _t("tile", (16, 64, 128, 4, 4), (16, 32, 256, 4, 4), (16, 32, 128, 4, 4, 2),
                    (16, 64, 256, 4, 3, 4), (16, 32, 128, 4, 4, 4), (16, 64, 128, 4, 4, 8),
                    (16, 32, 128, 4, 3, 8), (16, 128, 128, 4, 3, 4), (16, 64, 128, 4, 3, 2),
                    (16, 16, 256, 4, 4), (16, 32, 512, 4, 3, 2)),
        "mid": _t("tile", (64, 128, 128, 4, 3), (64, 64, 128, 4, 4), (128, 128, 128, 8, 3),
                  (32, 64, 128, 4, 4, 2), (64, 64, 128, 4, 4, 4))
        + _t("lag", (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 64, 128, 4, 4))
        + _t("tma", (64, 128, 128, 4, 4), (128, 128, 128, 8, 4)),
        "large": _t("tile", (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (64, 128, 128, 4, 3),
                    (256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 256, 128, 8, 4),
                    (256, 128, 128, 8, 3, 1, 16), (256, 128, 128, 8, 3, 1, 4), (128, 128, 128, 8, 3),
                    (64, 128, 128, 4, 4), (64, 128, 128, 4, 5), (128, 128, 64, 8, 4), (128, 128, 256, 8, 3),
                    (256, 128, 256, 8, 2), (128, 256, 256, 8, 2))
        + _t("lag", (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (64, 128, 128, 4, 3), (64, 128, 128, 4, 4),
             (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3, 1, 16))
        # TMA: the 256-row tile for tensor / row scales, 128 x 128 x 128 with 4 stages for block scales
        + _t("tma", (256, 128, 128, 8, 3, 1, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
             (128, 256, 128, 8, 3), (128, 128, 128, 8, 5), (64, 128, 128, 4, 3, 1, 16))
        + _t("tmap", (256, 128, 128, 8, 3, 1, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4))
        + _t("wsp", (128, 256, 128, 4, 4), (128, 256, 128, 4, 3), (128, 256, 128, 4, 4, 1, 16),
             (128, 128, 128, 4, 5), (128, 128, 128, 4, 6, 1, 16)),
    },
    "wonly": {
        # M <= 16: the word tiles and the self-reducing fused tiles. On an H200 (2026-12-04, every
        # candidate of the previous 46-config list pinned; int4-g128 and mxfp4, N x K = 4096 x 4096 and
        # smollm2's 576 x 576, 192 x 576, 1536 x 576, 576 x 1536) the six fastest at M = 16 were always
        # among these; "tile", "tilek" and the unsplit "fused" tiles never were. At M = 1 (where the
        # GEMVs are added) no tile came within 1.5x of the best GEMV. Fewer candidates: a shorter
        # cold tuning on a 4-bit target's first request.
        "small": _t("wordsk", (16, 64, 128, 4, 4, 4), (16, 64, 128, 4, 3, 4), (16, 32, 128, 2, 4, 4),
                    (16, 64, 128, 4, 4, 8), (16, 64, 64, 4, 4, 4), (16, 128, 128, 8, 3, 4))
        + _t("words", (16, 64, 128, 4, 4, 4), (16, 64, 256, 4, 3, 4))
        # a K step per warp (`_wonly_wordsb_kernel`): on an H200 (2026-12-04, 16 x 4096 x 4096, pinned) int4-g128
        # 8.3 us against 10.3 for the best "wordsk" above, mxfp4 9.3-9.5 against 11.2; 64-wide tiles, 2 or 8
        # warps and splits were all slower (10.6-21 us).
        + _t("wordsb", (16, 16, 128, 4, 3), (16, 16, 128, 4, 4), (16, 16, 64, 4, 3), (16, 32, 128, 4, 3))
        + _t("fusedk", (16, 32, 128, 4, 4, 8), (16, 64, 64, 4, 4, 8), (16, 32, 256, 4, 3, 8), (16, 64, 128, 4, 4, 4))
        # both MMA operands in place (quant/_gluon_w4.py; "wordsb" where Gluon cannot run): on an H100
        # (2026-12-06, flushed L2, the tuner's timing) mxfp4 with fp16 x at M = 16 13.8 us against 14.9
        # for "wordsb"; with its operands two steps ahead int4-g128 bf16 at M = 1 10.8 against 11.9 for
        # "gemvf"; elsewhere it loses (bench/wordsq_w4.py), so the tuner decides
        + _t("wordsq", (16, 16, 128, 4, 1), (16, 16, 128, 4, 2)),
        # Not "wordsg" (quant/_gluon_w4.py, pinned only): with the weight in L2 it won int4-g128 at
        # M = 1 (H100, 2026-12-05: 6.26 against 6.46 us for "gemvf"), but read from HBM, as a decode
        # step reads it, it lost everywhere (10.0 against 7.5 us; `bench/wonly_sweep.py --cold`).
        "mid": _t("tile", (64, 64, 128, 4, 3), (32, 64, 256, 4, 3, 2), (64, 128, 128, 4, 3),
                  (128, 128, 128, 8, 3), (64, 64, 128, 4, 3, 4)) + _t("deq", (128, 128, 64, 4, 4), (128, 256, 64, 8, 3))
        + _t("deqb", (1, 32, 256, 4, 1), (1, 64, 128, 4, 1)) + _t("fused", (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 128, 4, 3))
        + _HOPPER_MID_WORDS,  # word tiles
        # M = 17..32 (a decode batch up to 32): "wordsb" with 32 rows and mid's word tiles. On an H200
        # (2026-12-04, pinned, N = K = 4096) at M = 32 int4-g128 11.3 us against 12.9 for the best
        # "wordsk", mxfp4 12.2 against 13.6; at M = 24 12.6 / 13.7 against 13.2 / 14.0; mid's
        # "tile", "deq", "deqb" and "fused" took 34-59 us. At M = 64 "wordsb" was slower, so 32
        # is a bucket of its own.
        "mid32": _t("wordsb", (32, 32, 128, 4, 3), (32, 16, 128, 4, 3), (32, 16, 128, 4, 4))
        + _HOPPER_MID_WORDS,
        "large": _t("deq", (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                    (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 256, 64, 8, 3, 1, 16), (128, 128, 64, 4, 5))
        + _t("tile", (128, 128, 128, 8, 3)) + _t("deqb", (1, 32, 256, 4, 1), (1, 64, 128, 4, 1), (1, 16, 512, 4, 1))
        + _t("fused", (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
             (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)),
    },
}  # fmt: skip
_AMPERE = {
    "mm8": {
        "small": _HOPPER["mm8"]["small"],
        "mid": _t("tile", (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (32, 64, 128, 4, 3, 2)),
        "large": _t("tile", (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)),
    },
    "wonly": {
        "small": _HOPPER["wonly"]["small"],
        "mid": _t("tile", (64, 64, 128, 4, 3), (32, 64, 256, 4, 3, 2)) + _t("deq", (128, 128, 32, 4, 4)),
        "large": _t("deq", (128, 128, 32, 4, 4), (128, 256, 32, 8, 3)) + _t("tile", (128, 64, 128, 4, 3))
        + _t("deqb", (1, 32, 256, 4, 1)),
    },
}  # fmt: skip
_CDNA = {  # AMD: the stream pipeliner wants num_stages 2; MFMA likes wide K tiles
    "mm8": {
        "small": _t("tile", (16, 64, 128, 4, 2), (16, 64, 256, 4, 2, 4), (16, 128, 128, 4, 2, 8)),
        "mid": _t("tile", (64, 128, 128, 4, 2), (128, 128, 128, 8, 2)),
        "large": _t("tile", (256, 256, 128, 8, 2), (128, 128, 128, 4, 2), (256, 128, 128, 8, 2)),
    },
    "wonly": {
        "small": _t("tile", (16, 64, 256, 4, 2), (16, 64, 256, 4, 2, 4), (16, 128, 256, 8, 2, 8)),
        "mid": _t("tile", (64, 64, 128, 4, 2)) + _t("deq", (128, 128, 64, 4, 2)),
        "large": _t("deq", (256, 256, 64, 8, 2), (128, 128, 64, 4, 2)) + _t("tile", (128, 128, 128, 8, 2)),
    },
}  # fmt: skip
TABLES = {"hopper": _HOPPER, "ampere": _AMPERE, "cdna": _CDNA}

# Tests pin one config for the interpreter (monkeypatch): None = the interpreter's default below.
FORCE: Cfg | None = None
REJECTED: list[dict] = []  # configs whose numbers disagreed with the default's (see module doc)
TIE = 0.03  # configs within 3% of the fastest are re-timed before one is kept
RETIME_ROUNDS = 3  # interleaved re-timings per finalist; the median of these and the first wins
# GEMMs of at most this many rows (decode) are timed with the L2 flushed before every call (`time_cold`)
COLD_ROWS = 16
COLD_REPS = 40  # flushed calls per timing (each ~0.2 ms: the flush dominates)
CHOSEN: dict[str, dict] = {}  # key -> {"config", "us": {name: time}} for every tuned key


@contextlib.contextmanager
def pinned(cfg: Cfg | str | None) -> Iterator[None]:
    """Every GEMM inside runs `cfg` (a Cfg or its name; None: the tuner's own choice), and FORCE is
    what it was again after, also when a GEMM raises: what benches and checks that time or probe
    one config need around each call."""
    global FORCE
    before, FORCE = FORCE, Cfg.parse(cfg) if isinstance(cfg, str) else cfg
    try:
        yield
    finally:
        FORCE = before


def candidates(family: str, kind: str, m: int, n: int, k: int) -> list[Cfg]:
    """The candidate configs of `kind` ("mm8" | "wonly") for an M x N x K problem on `family`."""
    if family == "cpu":  # the interpreter: one program covers a small problem; cost is per op
        bm, bn = min(max(_pow2(m), 16), 64), min(max(_pow2(n), 16), 128)
        return [Cfg("tile", bm, bn, 128, 4, 1)]
    table = TABLES.get(family, _AMPERE)[kind]
    cls = "small" if m <= 16 else "mid32" if m <= 32 and "mid32" in table else "mid" if m <= 256 else "large"
    return list(table[cls]) + (_GEMV[kind] if m == 1 else [])


# one-token 8-bit GEMMs with the activation quantization inside the GEMV (_fastpath.mm8_act): this
# candidate is "not fused" -- the act-quant kernel, then the GEMM's own tuned choice (tiles unused)
QUANT2 = Cfg("quant2", 1, 1, 1, 1, 1)


def gemv_candidates(kind: str) -> list[Cfg]:
    """Only the M = 1 GEMV configs of `kind`: for kernels that exist in GEMV form alone."""
    return list(_GEMV[kind])


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Tuner:
    """Picks and caches one config per key; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}  # key -> config name (as on disk)
        self._parsed: dict[str, Cfg] = {}
        # re-entrant: a candidate may run ops of other keys (mm8_act's "quant2" runs mm8's)
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._disk: dict[str, str] | None = None  # the file's entries for this device, loaded once
        # key -> the config its first call in this process ran (tuned, stored, default or pinned):
        # what a benchmark reports beside its numbers, so a slow run can be traced to its choices
        self.used: dict[str, str] = {}
        self._local = threading.local()  # .precompiling: this thread's calls compile, not tune
        self._precompiled: set[str] = set()

    @contextlib.contextmanager
    def precompiling(self) -> Iterator[None]:
        """Inside: a key that would be tuned runs each candidate once instead (compiling it, no
        timing, nothing chosen or stored) and the call takes the first. Triton compiling the
        candidates is most of a cold warm-up (66 of 92 s for int4-g128 on an H100); done before
        the servers' tuning lock, the servers of a GPU gate compile side by side, and only the
        timing takes turns."""
        self._local.precompiling = True
        try:
            yield
        finally:
            self._local.precompiling = False

    @property
    def _precompiling(self) -> bool:
        return getattr(self._local, "precompiling", False)

    def reload_disk(self) -> None:
        """Read the stored choices again at the next miss (another process may have added some)."""
        with self._lock:
            self._disk = None

    def clear(self) -> None:
        """Forget every choice in this process, the stored ones too (the next calls tune afresh)."""
        with self._lock:
            self._disk = {}
            self._cache.clear()
            self._parsed.clear()
            self.used.clear()
            self._precompiled.clear()
            CHOSEN.clear()

    def pick(self, key: str, candidates: Callable[[], list[Cfg]], run: Callable[[Cfg], torch.Tensor], *,
             tune: bool, rows: int = COLD_ROWS + 1) -> Cfg:  # fmt: skip
        """The config for `key`. `candidates()` lists them (called only on a cache miss: a hit costs
        two dict lookups); `run(cfg)` launches the op with cfg and returns its output tensor.
        tune=False (interpreter, CPU): the first candidate, no timing. `rows`: the GEMM's M; up to
        COLD_ROWS (decode) the candidates are timed with their weights coming from HBM."""
        cfg = self._pick(key, candidates, run, tune=tune, cold=rows <= COLD_ROWS)
        if key not in self.used and not self._precompiling:
            self.used[key] = cfg.name
        return cfg

    def _pick(self, key: str, candidates: Callable[[], list[Cfg]], run: Callable[[Cfg], torch.Tensor], *,
              tune: bool, cold: bool) -> Cfg:  # fmt: skip
        if FORCE is not None:
            return FORCE
        if not tune:
            return candidates()[0]
        hit = self._parsed.get(key)
        if hit is not None:
            return hit
        name = self._cache.get(key)
        cands: list[Cfg] | None = None
        if name is None and (stored := self._from_disk(key)) is not None:
            cands = candidates()
            if stored in {c.name for c in cands}:
                name = self._cache[key] = stored
            else:  # written by other kernels' lists: retune rather than replay a config that no longer exists
                logger.info("stored triton config %s for %s is not a candidate now: retuning", stored, key)
        if name is not None:
            self._parsed[key] = Cfg.parse(name)
            return self._parsed[key]
        cands = cands if cands is not None else candidates()
        if len(cands) == 1:
            return cands[0]
        if torch.cuda.is_current_stream_capturing():
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("triton config for %s not tuned before CUDA graph capture: using %s",
                               key, cands[0].name)  # fmt: skip
            return cands[0]
        if self._precompiling:
            with self._lock:
                self._precompile(key, cands, run)
            return cands[0]
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._tune(key, cands, run, cold).name
                self._to_disk(key, self._cache[key])
            return Cfg.parse(self._cache[key])

    def _precompile(self, key: str, cands: list[Cfg], run: Callable[[Cfg], torch.Tensor]) -> None:
        """Run every candidate of `key` once (its compile), untimed; a failure is left for `_tune`
        to meet and report."""
        if key in self._precompiled:
            return
        self._precompiled.add(key)
        t0, ran = time.monotonic(), 0
        for cfg in cands:
            try:
                run(cfg)
                torch.cuda.synchronize()
                ran += 1
            except Exception as e:  # e.g. out of shared memory on this GPU: _tune skips it too
                logger.debug("precompiling %s for %s: %s", cfg.name, key, str(e).splitlines()[0:1])
        # a line per key: the launcher reads a growing log as a server still starting
        logger.info("triton configs for %s compiled: %d of %d ran (%.1f s)", key, ran, len(cands),
                    time.monotonic() - t0)  # fmt: skip

    def _tune(
        self, key: str, cands: list[Cfg], run: Callable[[Cfg], torch.Tensor], cold: bool = False
    ) -> Cfg:
        timer = time_cold if cold else _time

        ref: torch.Tensor | None = None
        times: dict[str, float] = {}
        for cfg in cands:
            try:
                out = run(cfg)
                torch.cuda.synchronize()
            except Exception as e:  # e.g. out of shared memory on this GPU: not a candidate here
                logger.info(
                    "triton config %s for %s does not run: %s", cfg.name, key, str(e).splitlines()[0:1]
                )
                continue
            if ref is None:
                ref = out.detach().clone()
            elif not agree(out, ref):
                REJECTED.append({"key": key, "config": cfg.name, "reference": cands[0].name})
                logger.error(
                    "triton config %s for %s disagrees with %s: rejected", cfg.name, key, cands[0].name
                )
                continue
            times[cfg.name] = timer(lambda cfg=cfg: run(cfg)) * 1e3
        if not times:
            raise RuntimeError(f"no triton config runs for {key}: {[c.name for c in cands]}")
        near = finalists(times)
        if len(near) > 1:  # a near-tie: one short timing each is noise, so time them again, interleaved
            rounds = {n: [times[n]] for n in near}
            for _ in range(RETIME_ROUNDS):
                for n in near:
                    rounds[n].append(timer(lambda cfg=Cfg.parse(n): run(cfg)) * 1e3)
            times.update({n: statistics.median(ts) for n, ts in rounds.items()})
        best = min(near, key=times.__getitem__)
        CHOSEN[key] = {"config": best, "us": {n: round(t, 2) for n, t in times.items()}, "finalists": near,
                       "cold": cold}  # fmt: skip
        logger.info("triton config for %s: %s (%.1f us of %d timed)", key, best, times[best], len(times))
        return Cfg.parse(best)

    # -- disk cache: {"<device>|<triton version>|<kernel sources hash>|key": config name}
    def disk_path(self) -> Path | None:
        """Where the choices are stored (None: memory only)."""
        p = os.environ.get("DIFFTEST_TRITON_TUNE_CACHE", "")
        if p.lower() in ("0", "off", "false", "no"):
            return None
        if p:
            return Path(p)
        from server_shim.models import cache_root

        return cache_root() / "triton-tune.json"

    def _prefix(self) -> str:
        import triton

        return f"{torch.cuda.get_device_name()}|{triton.__version__}|{kernel_sources_hash()}|"

    def _from_disk(self, key: str) -> str | None:
        if self._disk is None:
            self._disk = {}
            path = self.disk_path()
            try:
                saved = json.loads(path.read_text()) if path is not None and path.is_file() else {}
            except (OSError, ValueError) as e:
                logger.warning("ignoring the triton config cache %s: %s", path, e)
                saved = {}
            pre = self._prefix()
            if isinstance(saved, dict):
                self._disk = {
                    k[len(pre) :]: v for k, v in saved.items() if k.startswith(pre) and isinstance(v, str)
                }
        return self._disk.get(key)

    def _to_disk(self, key: str, name: str) -> None:
        path = self.disk_path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # merge: another server process may have added its keys since
                saved = json.loads(path.read_text()) if path.is_file() else {}
            except ValueError:
                saved = {}
            saved = saved if isinstance(saved, dict) else {}
            saved[self._prefix() + key] = name
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: no torn writes
            tmp.write_text(json.dumps(saved, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError as e:
            logger.warning("cannot write the triton config cache %s: %s", path, e)


# the fast kernels' bodies (_triton_fast.MODULES), named here so that hashing them imports nothing
FAST_BODIES = ("_fast_common.py", "_fast_mm8.py", "_fast_w4.py", "_fast_gemv4.py")


@functools.cache
def kernel_sources_hash() -> str:
    """12 hex digits over the fast kernels' sources and this file's candidate lists: stored choices
    from other kernels (another checkout, an older release) are never replayed."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("_triton_fast.py", *FAST_BODIES, "_gluon_mm8.py", "_fastpath.py", "kernels.py", "tuning.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def finalists(times: dict[str, float], tie: float = TIE, most: int = 3) -> list[str]:
    """The configs timed within `tie` (relative) of the fastest, fastest first, at most `most`:
    those whose order one short timing cannot settle (README: a 1024-row fp8 GEMM's two "wsp"
    tiles at 32.1 and 32.2 us, where longer timings put the wider one 4% ahead)."""
    ranked = sorted(times, key=times.__getitem__)
    return [n for n in ranked if times[n] <= times[ranked[0]] * (1 + tie)][:most]


def _time(fn: Callable[[], object]) -> float:
    """Milliseconds per call of fn, from CUDA-graph replays: what a served step (graph replay) pays.
    Eager timing would measure Triton's Python launch cost (tens of us) at small shapes, where the
    kernels take a few us, and so pick the config with the fewest launches, never a split-K one.
    Falls back to eager timing when fn cannot be captured."""
    import triton.testing

    try:
        return time_graph(fn, rep_ms=5)
    except Exception as e:  # noqa: BLE001 - any capture failure: time eagerly instead
        logger.info("graph timing failed (%s): timing eagerly", str(e).splitlines()[0:1])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=3, rep=12))


def time_graph(fn: Callable[[], object], rep_ms: float) -> float:
    """Milliseconds per call of fn: the median of 10 replays of one CUDA graph of as many calls as
    fill about rep_ms. As triton's `do_bench_cudagraph`, but captured on the stream fn warmed up on
    (`_warm_up_aside`), as the shim's graphs are (`cuda_graphs`): what fn keeps per stream (the
    split-K counters of `_fastpath._counters`) exists when captured, so a self-reducing split is
    timed as a served graph runs it, not as the second-kernel fallback a fresh capture stream gets."""
    side = _warm_up_aside(fn)
    with torch.cuda.stream(side):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        reps = max(1, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(reps):
                fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def flush_bytes(l2_bytes: int) -> int:
    """The L2 flush's size: four times the L2 and at least 512 MiB (twice an MI300's 256 MB Infinity
    Cache, which torch does not report as L2), so that reading it evicts every line of the weights
    and takes long enough (~0.2 ms) for the timed call's launch to be queued while it runs: the GPU
    then meets the start event, the kernel(s) and the end event back to back."""
    return max(4 * l2_bytes, 512 << 20)


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (torch's device properties; 64 MiB where they do not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)


def _warm_up_aside(fn: Callable[[], object]) -> torch.cuda.Stream:
    """fn twice on a side stream before a capture, which then captures on it (returned): its
    allocations and first-call work (tuning, compiling) stay out of the graph, and what it keeps per
    stream (split-K counters) is there when captured, as in the shim's own graphs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    return side


def read_flush(flush: torch.Tensor, sink: torch.Tensor) -> None:
    """Flush the L2 by reading `flush` (summed into `sink`): it leaves clean lines, as a decode
    step's other layers' weights do, not dirty ones for the timed kernel to write back."""
    torch.sum(flush, 0, dtype=torch.int64, out=sink)


def graphed(fn: Callable[[], object]) -> Callable[[], object] | None:
    """fn captured in a CUDA graph (its replay), or None where fn cannot be captured: a replay
    queues the kernels alone, with none of the Python that launched them (dispatch, Triton's
    launcher, the activation's quantization call), which is what a served step replays too."""
    try:
        side = _warm_up_aside(fn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any capture failure: the caller times fn eagerly
        logger.info("graph capture failed (%s): timing eagerly", str(e).splitlines()[0:1])
        torch.cuda.synchronize()
        return None
    return graph.replay


def _cold_in_one_graph(fn: Callable[[], object], flush: torch.Tensor, sink: torch.Tensor, reps: int) -> float:
    """`time_cold`'s timing with the reps in one CUDA graph, each a flush, a start event, fn and an
    end event (events recorded as graph nodes: torch's `external` events): nothing between the
    events but fn's kernels, as in a decode step's graph, where the kernels run back to back."""
    starts = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(reps)]
    side = _warm_up_aside(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for start, end in zip(starts, ends, strict=True):
            read_flush(flush, sink)
            start.record()
            fn()
            end.record()
    graph.replay()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def time_cold(fn: Callable[[], object], reps: int = COLD_REPS) -> float:
    """Median milliseconds of fn with the L2 flushed before every call: a decode step reads each
    layer's weights once, after the other layers' weights have pushed them out of the L2, while a
    replayed GEMM finds its weight there (a bf16 4096 x 4096 weight is 32 MiB, an H100's L2 50 MB).
    The two rank configs differently: on an H100 the M = 1 int4-g128 "gemvf" tile with two rows per
    program took 6.46 us with its weight in L2 and 9.45 from HBM, against 6.52 / 7.50 for one row.

    The flush reads a buffer (a decode step's L2 holds the previous layers' weights: clean lines,
    not the dirty ones a written flush leaves for the timed kernel to write back), and fn runs
    inside a CUDA graph, all reps in one (`_cold_in_one_graph`) where this torch records events in
    graphs, else a replay per rep (`graphed`), else eagerly. Timed eagerly after a written flush
    (until 2026-12-05) the numbers were too high: on an H100 fp8 block scales at M = 16 took 58 us
    where the tuner's own flushed timing of the kernel gave 19, and bf16 23 us where weight copies
    read in turn in one graph (bench/wonly_sweep.py --cold) took 16.9. Side by side
    (bench/cold_timing.py) the written flush, not the Python launch, cost bf16 its 4 us."""
    device = torch.device("cuda", torch.cuda.current_device())
    l2 = l2_bytes(device)
    try:
        flush = torch.ones(flush_bytes(l2) // 4, dtype=torch.int32, device=device)
    except torch.cuda.OutOfMemoryError:  # a full GPU: time it replayed rather than not at all
        logger.warning(
            "no memory for the L2 flush (%d MiB): timing a decode GEMM replayed", flush_bytes(l2) >> 20
        )
        return _time(fn)
    sink = torch.empty((), dtype=torch.int64, device=device)
    try:
        return _cold_in_one_graph(fn, flush, sink, reps)
    except Exception as e:  # noqa: BLE001 - no events in graphs here, or fn not capturable
        logger.info("one-graph cold timing failed (%s): a replay per call", str(e).splitlines()[0:1])
        torch.cuda.synchronize()
    call = graphed(fn) or fn
    for _ in range(3):
        call()
    return flushed_median_ms(call, lambda: read_flush(flush, sink), reps)


def flushed_median_ms(call: Callable[[], object], flush: Callable[[], object], reps: int) -> float:
    """Median milliseconds of call between two events, flush() queued before each: the loop of
    `time_cold`'s fallback, and of bench/cold_timing.py's comparisons."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def agree(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-2) -> bool:
    """Same NaN/inf pattern, and the finite values within rtol of ref's norm (different K splits
    and tiles round differently; a wrong kernel is off by O(1))."""
    o, r = out.double(), ref.double()
    fin = torch.isfinite(r)
    if not torch.equal(fin, torch.isfinite(o)) or not torch.equal(_code(o[~fin]), _code(r[~fin])):
        return False
    d, n = (o[fin] - r[fin]).norm(), r[fin].norm()
    return bool(d <= rtol * n) if n > 0 else bool(d == 0)


def _code(t: torch.Tensor) -> torch.Tensor:
    return t.nan_to_num(0.0, 1.0, -1.0)  # NaN 0, +inf 1, -inf -1


TUNER = Tuner()
