"""Builders of realistic `RunResult` trees for the report tests (no server, no metrics code).

`sample_run()` is what `make run` produces in miniature: a reference, a correct `fp8-block` target
that PASSes both parts, and a faulted `fp8-block` negative control that FAILs exactness with a
localisation (first divergent layer 3, local error in `model.layers.3.mlp.down_proj`). The
prompts carry the texts that break naive renderers: HTML (`<script>`), markdown pipes, newlines,
CJK. `degraded_run()` is a run that went wrong: failed requests, metrics that were not measured
(None), skipped parts, a target without a verdict.
"""

from __future__ import annotations

from difftest.results import (
    Check,
    Comparison,
    LayerDiff,
    LayerPoint,
    PartVerdict,
    PromptDiff,
    RunResult,
    TargetResult,
    TargetVerdict,
)

XSS_PROMPT = '<script>alert("x")</script> & a|b'
LOCALISATION = "first divergent layer 3, local error in model.layers.3.mlp.down_proj, backend triton, scales look transposed"
NUM_LAYERS = 6


def _prompts(faulty: bool) -> list[PromptDiff]:
    """Three prompts; the faulty target diverges on two of them."""
    same = PromptDiff(
        prompt_id="arith",
        prompt="1+2+3=",
        tags=["math"],
        ref_text=" 6",
        tgt_text=" 6",
        ref_tokens=[" ", "6"],
        tgt_tokens=[" ", "6"],
        ref_token_ids=[216, 38],
        tgt_token_ids=[216, 38],
        match_rate=1.0,
        exact=True,
        common_prefix=2,
        bleu=100.0,
        chrf=100.0,
        garbled=False,
        position_kl=[0.0001, 0.0002],
        kl_mean=0.00015,
        kl_lower=0.0001,
        kl_upper=0.0003,
        top1_agreement=1.0,
        dp_mean=0.001,
        dp_rms=0.002,
    )
    ref_cap = [" The", " capital", " of", " France", " is", " Paris", "."]
    tgt_cap = [" The", " capital", " of", " France", " is", " Lyon", "."] if faulty else list(ref_cap)
    capital = PromptDiff(
        prompt_id="capital",
        prompt=XSS_PROMPT,
        tags=["facts", "<b>html</b>"],
        ref_text="".join(ref_cap),
        tgt_text="".join(tgt_cap),
        ref_tokens=ref_cap,
        tgt_tokens=tgt_cap,
        match_rate=6 / 7 if faulty else 1.0,
        exact=not faulty,
        common_prefix=5 if faulty else 7,
        first_divergence=5 if faulty else None,
        divergence_kind="WRONG" if faulty else None,
        ref_alternatives={" Paris": -0.05, " Lyon": -4.2, " the": -5.0} if faulty else {},
        tgt_alternatives={" Lyon": -0.3, " Paris": -1.6, "<b>": -6.0} if faulty else {},
        garbled=False,
        bleu=70.0 if faulty else 100.0,
        chrf=80.0 if faulty else 100.0,
        position_kl=[0.001, 0.002, 0.001, 0.01, 0.02, 2.5, 0.3] if faulty else [0.001] * 7,
        kl_mean=0.405 if faulty else 0.001,
        kl_lower=0.40 if faulty else 0.001,
        kl_upper=0.42 if faulty else 0.002,
        top1_agreement=6 / 7 if faulty else 1.0,
        dp_mean=0.12 if faulty else 0.001,
        dp_rms=0.3 if faulty else 0.002,
    )
    ref_zh = ["你好", "\n", "世界", "|", "end"]
    tgt_zh = ["你好", "\n", "地球", "|", "end"] if faulty else list(ref_zh)
    chinese = PromptDiff(
        prompt_id="zh",
        prompt="Translate into Chinese:\nHello | world",
        tags=["translation"],
        ref_text="".join(ref_zh),
        tgt_text="".join(tgt_zh),
        ref_tokens=ref_zh,
        tgt_tokens=tgt_zh,
        match_rate=0.8 if faulty else 1.0,
        exact=not faulty,
        common_prefix=2 if faulty else 5,
        first_divergence=2 if faulty else None,
        divergence_kind="DRIFT" if faulty else None,
        ref_alternatives={"世界": -0.2, "地球": -1.9} if faulty else {},
        tgt_alternatives={"地球": -0.4, "世界": -1.2} if faulty else {},
        garbled=False,
        bleu=60.0 if faulty else 100.0,
        chrf=70.0 if faulty else 100.0,
        position_kl=[0.001, 0.002, 0.9, 0.05, 0.01] if faulty else [0.0005] * 5,
        kl_mean=0.1926 if faulty else 0.0005,
        kl_lower=0.19 if faulty else 0.0004,
        kl_upper=0.2 if faulty else 0.0006,
        top1_agreement=0.8 if faulty else 1.0,
        dp_mean=0.05 if faulty else 0.0001,
        dp_rms=0.1 if faulty else 0.0002,
    )
    return [same, capital, chinese]


def _aggregate(faulty: bool) -> tuple[dict[str, float], dict[str, list[float]]]:
    if faulty:
        agg = {
            "kl_mean": 0.1994,
            "kl_p99": 2.4,
            "top1_agreement": 0.857,
            "token_match": 0.886,
            "median_first_divergence": 3.5,
            "bleu": 68.0,
            "chrf": 77.0,
            "exact_match": 1 / 3,
        }
        ci = {"kl_mean": [0.05, 0.41], "top1_agreement": [0.8, 1.0]}
    else:
        agg = {
            "kl_mean": 0.00055,
            "kl_p99": 0.0019,
            "top1_agreement": 1.0,
            "token_match": 1.0,
            "median_first_divergence": None,
            "bleu": 100.0,
            "chrf": 100.0,
            "exact_match": 1.0,
        }
        ci = {"kl_mean": [0.0001, 0.001], "top1_agreement": [1.0, 1.0]}
    return {k: v for k, v in agg.items() if v is not None}, ci


def _comparison(kind: str, baseline: str, target: str, faulty: bool) -> Comparison:
    agg, ci = _aggregate(faulty)
    return Comparison(
        kind=kind, baseline=baseline, target=target, prompts=_prompts(faulty), aggregate=agg, ci=ci
    )


def _layers(against: str, kind: str, fault_layer: int | None) -> LayerDiff:
    points: list[LayerPoint] = []
    for i in range(NUM_LAYERS):
        broken = fault_layer is not None and i >= fault_layer
        local_broken = fault_layer is not None and i == fault_layer
        cos = 0.93 if broken else 1.0 - 1e-6 * (i + 1)
        points.append(
            LayerPoint(
                name=f"model.layers.{i}",
                layer=i,
                kind="residual",
                cosine=cos,
                norm_ratio=1.3 if broken else 1.0,
                rel_err=0.35 if broken else 1e-3,
                max_abs=2.0 if broken else 1e-3,
                sqnr_db=9.0 if broken else 60.0,
                flagged=broken,
            )
        )
        points.append(
            LayerPoint(
                name=f"model.layers.{i}.mlp.down_proj",
                layer=i,
                kind="linear",
                cosine=0.80 if broken else 1.0 - 2e-6,
                norm_ratio=1.9 if local_broken else 1.0,
                rel_err=0.6 if broken else 2e-3,
                max_abs=3.0 if broken else 2e-3,
                sqnr_db=4.0 if broken else 54.0,
                flagged=broken,
                local_cosine=0.81 if local_broken else 1.0 - 1e-6 * (1 + i % 3),
                local_norm_ratio=1.9 if local_broken else 1.0,
                local_rel_err=0.6 if local_broken else 1e-4 * (1 + i % 3),
            )
        )
    points.append(
        LayerPoint(
            name="logits",
            layer=None,
            kind="logits",
            cosine=0.9 if fault_layer is not None else 1.0 - 1e-7,
            norm_ratio=1.1,
            rel_err=0.2,
            max_abs=5.0,
            sqnr_db=14.0,
            flagged=fault_layer is not None,
        )
    )
    diff = LayerDiff(against=against, kind=kind, points=points)
    if fault_layer is not None:
        diff.first_divergent_layer = fault_layer
        diff.first_divergent_point = f"model.layers.{fault_layer}.mlp.down_proj"
        diff.guilty_module = f"model.layers.{fault_layer}.mlp.down_proj"
        diff.guilty_backend = "triton"
        diff.audit_hint = "scales look transposed"
        diff.summary = "local error: the module is wrong on the golden's own input"
    return diff


def _checks(part: str, faulty: bool) -> tuple[Check, ...]:
    note = "noise floor x3" if part == "exactness" else "budget fp8-block"
    kl_limit = 0.005 if part == "exactness" else 0.05
    kl = 0.1994 if faulty else 0.00055
    top1 = 0.857 if faulty else 1.0
    return (
        Check("kl_mean", kl, kl_limit, "<=", kl <= kl_limit, note=note),
        Check("top1_agreement", top1, 0.95, ">=", top1 >= 0.95, note=note),
        Check("bleu", None, 50.0, ">=", True, required=False, note="not asked"),
    )


def _audit(broken: bool) -> list[dict[str, object]]:
    return [
        {
            "module": "model.layers.3.mlp.down_proj",
            "scheme": "fp8-block",
            "backend": "triton",
            "scale_shape": [5, 12],
            "scale_stride": [1, 5],
            "declared": "col-major",
            "best_hypothesis": "transposed" if broken else "declared",
            "flagged": broken,
        },
        {
            "module": "model.layers.3.self_attn.q_proj",
            "scheme": "fp8-block",
            "backend": "triton",
            "scale_shape": [5, 5],
            "scale_stride": [5, 1],
            "declared": "row-major",
            "best_hypothesis": "declared",
            "flagged": False,
        },
    ]


def _layer_parts(golden: str, faulty: bool) -> tuple[PartVerdict, PartVerdict]:
    """The white-box "layers" parts as difftest.layers.layer_verdict writes them."""
    worst = "model.layers.3.mlp.down_proj" if faulty else "model.layers.5.mlp.down_proj"
    exact = PartVerdict(
        "layers",
        golden,
        (
            Check(
                "local_rel_err_max",
                0.6 if faulty else 1e-4,
                1e-3,
                "<=",
                not faulty,
                note=f"{worst}; module replayed on the golden's input",
            ),
            Check(
                "point_rel_err_max",
                0.35 if faulty else 1e-3,
                5e-2,
                "<=",
                not faulty,
                note="model.layers.3; accumulated vs golden",
            ),
        ),
    )
    acc = PartVerdict(
        "layers",
        "reference",
        (
            Check(
                "local_cosine_min",
                0.81 if faulty else 1.0 - 1e-6,
                0.995,
                ">=",
                not faulty,
                note=f"{worst}; module budget fp8-block",
            ),
        ),
    )
    return exact, acc


def _target(name: str, *, faulty: bool, expect: str) -> TargetResult:
    golden = f"{name}-golden"
    exact_parts = PartVerdict("exactness", golden, _checks("exactness", faulty))
    acc_parts = PartVerdict("accuracy", "reference", _checks("accuracy", faulty))
    layers_exact, layers_acc = _layer_parts(golden, faulty)
    inv = PartVerdict("invariance", "", (Check("slot_max_abs_logprob_diff", 0.0, 1e-5, "<=", True),))
    verdict = TargetVerdict(
        target=name,
        expect=expect,
        parts=(exact_parts, acc_parts, layers_exact, layers_acc, inv),
        localisation=LOCALISATION if faulty else None,
        warnings=("echoed logprobs checked against generation logprobs",) if faulty else (),
    )
    return TargetResult(
        name=name,
        scheme="fp8-block",
        expect=expect,
        url="http://127.0.0.1:8101",
        golden=golden,
        comparisons=[
            _comparison("exactness", golden, name, faulty),
            _comparison("accuracy", "reference", name, faulty),
        ],
        layers=[
            _layers(golden, "exactness", 3 if faulty else None),
            _layers("reference", "accuracy", 3 if faulty else None),
        ],
        audit=_audit(faulty),
        invariance={"slots": [0, 1, 3], "max_abs_logprob_diff": 0.0},
        conformance={"echo": True, "logprobs_cap": 20, "token_ids": "return_tokens_as_token_ids"},
        verdict=verdict,
        failed_requests=0,
        total_requests=12,
    )


def sample_run(*, fault_expect: str = "fail") -> RunResult:
    """A PASS target and a faulted FAIL target (`fault_expect` "fail" = a negative control)."""
    return RunResult(
        reference="reference",
        targets=[
            _target("fp8-block", faulty=False, expect="pass"),
            _target("fp8-block-faulty", faulty=True, expect=fault_expect),
        ],
        signature={
            "difftest": "0.1.0",
            "python": "3.12.3",
            "numpy": "2.1.0",
            "seed": 0,
            "max_tokens": 24,
            "logprobs": 5,
            "servers": {"reference": {"model": "smollm2-135m", "dtype": "float32"}},
            "thresholds": {"exactness_margin": 3.0},
        },
        noise_floor={"kl_mean": 0.00012, "top1_agreement": 1.0, "source": "noise.json"},
        warnings=["reference: greedy determinism checked twice"],
        started_at="2025-01-01T00:00:00Z",
        elapsed_s=42.5,
    )


def degraded_run() -> RunResult:
    """A run where requests failed and metrics are missing: renderers must say n/a, never 0."""
    failed = PromptDiff(prompt_id="p1", prompt="Tell me a story", error="HTTP 500: engine died")
    partial = PromptDiff(
        prompt_id="p2",
        prompt="2+2=",
        ref_text=" 4",
        tgt_text=" 4",
        ref_tokens=[" 4"],
        tgt_tokens=[" 4"],
        match_rate=1.0,
        exact=True,
    )
    comp = Comparison(
        kind="accuracy",
        baseline="reference",
        target="broken",
        prompts=[failed, partial],
        aggregate={"n_prompts": 2.0, "failed_requests": 1.0, "failed_rate": 0.5, "token_match": 0.5},
        warnings=["no echo: teacher-forced metrics skipped"],
    )
    verdict = TargetVerdict(
        target="broken",
        expect="pass",
        parts=(
            PartVerdict("exactness", "", skipped="no golden"),
            PartVerdict(
                "accuracy",
                "reference",
                (Check("kl_mean", None, 0.05, "<=", False, note="no echo"),),
            ),
        ),
    )
    return RunResult(
        reference="reference",
        targets=[
            TargetResult(
                name="broken",
                scheme=None,
                expect="pass",
                comparisons=[comp],
                verdict=verdict,
                failed_requests=1,
                total_requests=2,
            ),
            TargetResult(name="never-ran", scheme="int4-g128", expect="pass"),
        ],
        warnings=["target never-ran: server died during start"],
    )


def big_run(n_prompts: int, n_targets: int = 3, *, seed: int = 0) -> RunResult:
    """A synthetic run at scale: `n_prompts` prompts x `n_targets` targets x 2 comparisons.

    Built directly (no server, no metrics code), deterministic; the last target is a faulted
    negative control whose prompts diverge more often and whose exactness part fails. Token
    lists are shared between prompts where they are equal, as a real run's would not be, but the
    renderers copy what they keep, so the page's size is what a real run of this size gives.
    """
    import random

    rng = random.Random(seed)
    words = [f" w{i}" for i in range(400)]
    tag_names = ["math", "code", "facts", "translation", "story", "reasoning", "list", "json"]
    base = [rng.choice(words) for _ in range(24)]
    ids = [hash(w) % 49152 for w in base]
    targets = []
    for k in range(n_targets):
        name = f"target-{k}"
        faulty = k == n_targets - 1
        comps = []
        for kind, baseline in (("exactness", f"{name}-golden"), ("accuracy", "reference")):
            prompts = []
            for i in range(n_prompts):
                r = rng.random()
                diverge = r < (0.6 if faulty else 0.15)
                d = rng.randrange(1, 23) if diverge else None
                tgt = list(base) if d is None else base[:d] + [rng.choice(words)] + base[d:-1]
                kl = [rng.random() * (0.3 if faulty else 0.01) for _ in range(24)]
                prompts.append(
                    PromptDiff(
                        prompt_id=f"p{i:05d}",
                        prompt=f"Prompt number {i}: tell me about item {i * 7919 % 10**6}",
                        tags=[tag_names[i % len(tag_names)]],
                        ref_text="".join(base),
                        tgt_text="".join(tgt),
                        ref_tokens=base,
                        tgt_tokens=tgt,
                        ref_token_ids=ids,
                        tgt_token_ids=[hash(w) % 49152 for w in tgt],
                        match_rate=1.0 if d is None else d / 24,
                        exact=d is None,
                        common_prefix=24 if d is None else d,
                        first_divergence=d,
                        divergence_kind=None if d is None else rng.choice(["TIE", "DRIFT", "WRONG"]),
                        ref_alternatives={} if d is None else {str(ids[d]): -0.1, str(ids[0]): -2.5},
                        tgt_alternatives={} if d is None else {str(ids[0]): -0.2, str(ids[d]): -1.5},
                        garbled=False,
                        position_kl=kl,
                        kl_mean=sum(kl) / 24,
                        kl_lower=0.0,
                        kl_upper=sum(kl) / 12,
                        top1_agreement=1.0 - (0.1 if diverge else 0.0),
                    )
                )
            agg = {
                "kl_mean": sum(p.kl_mean or 0.0 for p in prompts) / n_prompts,
                "top1_agreement": sum(p.top1_agreement or 0.0 for p in prompts) / n_prompts,
                "token_match": sum(p.match_rate or 0.0 for p in prompts) / n_prompts,
            }
            comps.append(Comparison(kind, baseline, name, prompts=prompts, aggregate=agg))
        exact_limit = 0.005
        parts = tuple(
            PartVerdict(
                c.kind,
                c.baseline,
                (
                    Check(
                        "kl_mean",
                        c.aggregate["kl_mean"],
                        exact_limit if c.kind == "exactness" else 0.08,
                        "<=",
                        c.aggregate["kl_mean"] <= (exact_limit if c.kind == "exactness" else 0.08),
                        note="noise floor x3" if c.kind == "exactness" else "budget fp8-block",
                    ),
                ),
            )
            for c in comps
        )
        verdict = TargetVerdict(
            name, "fail" if faulty else "pass", parts, localisation=LOCALISATION if faulty else None
        )
        layers = [_layers(f"{name}-golden", "exactness", 3 if faulty else None)]
        targets.append(
            TargetResult(
                name,
                "fp8-block",
                "fail" if faulty else "pass",
                golden=f"{name}-golden",
                comparisons=comps,
                layers=layers,
                verdict=verdict,
                total_requests=4 * n_prompts,
            )
        )
    return RunResult(reference="reference", targets=targets, elapsed_s=1.0)
