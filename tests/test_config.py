"""difftest.config: shipped configs parse, every error names file, line, section and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from difftest.config import RunConfig, load_config
from difftest.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path: Path, body: str, name: str = "x.toml") -> Path:
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return path


MINIMAL = """
[run]
prompts = "p.jsonl"

[reference]
model = "tiny-llama"

[[target]]
name = "t"
model = "tiny-llama"
quant = "fp8-block"
golden = "auto"
"""


# ----------------------------------------------------------------------------- shipped configs


def test_shipped_configs_exist() -> None:
    assert {p.name for p in SHIPPED} >= {"default.toml", "external.toml", "fault-demo.toml", "ci-small.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.targets and cfg.run.prompts and all(p.is_file() for p in cfg.run.prompts)
    names = [s.name for s in cfg.servers()]
    assert len(names) == len(set(names))


def test_default_config_is_issue5_part12() -> None:
    cfg = load_config(ROOT / "configs" / "default.toml")
    assert (cfg.reference.model, cfg.reference.dtype, cfg.reference.kind) == (
        "smollm2-135m",
        "float32",
        "shim",
    )
    assert cfg.run.prompts == ((ROOT / "prompts" / "smoke.jsonl").resolve(),)
    assert cfg.run.output_dir == (ROOT / "runs" / "default").resolve() and cfg.run.max_tokens == 24
    by = {t.name: t for t in cfg.targets}
    assert [(t.server.quant, t.server.backend, t.expect) for t in cfg.targets] == [
        ("fp8-block", "auto", "pass"),
        ("int4-g128", "auto", "pass"),
        ("fp8-token", "vendor", "pass"),
        ("fp8-block", "auto", "fail"),
    ]
    vendor = by["fp8-token-vendor"]
    assert (
        vendor.golden.backend == "torch"
        and vendor.golden.quant == "fp8-token"
        and vendor.scheme == "fp8-token"
    )
    faulty = by["fp8-block-faulty"]
    assert faulty.server.faults and faulty.golden.faults == ()
    assert faulty.golden is by["fp8-block"].golden  # one golden server for both fp8-block targets
    # reference, 4 targets, 3 goldens (fp8-block's is shared) and each golden's rounding twin
    assert len(cfg.servers()) == 11
    assert faulty.twin == by["fp8-block"].twin and faulty.twin.rounding_noise == "auto"
    assert faulty.twin.name == "fp8-block-golden-twin" and faulty.twin.backend == "torch"
    assert all(s.debug for s in cfg.servers())  # whitebox = "auto" turns the debug routes on


# ----------------------------------------------------------------------------- values and defaults


def test_minimal_config_defaults_and_golden_auto(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, RunConfig) and cfg.source == tmp_path / "x.toml"
    run = cfg.run
    assert (run.max_tokens, run.logprobs, run.concurrency, run.seed, run.whitebox) == (32, 5, 8, 0, "auto")
    assert (run.request_timeout_s, run.max_retries, run.error_rate_limit, run.limit) == (120.0, 3, 0.05, None)
    assert run.output_dir == Path.cwd() / "runs" / "x" and run.batch_slot_check is True
    (t,) = cfg.targets
    assert (t.name, t.scheme, t.expect) == ("t", "fp8-block", "pass")
    assert t.golden.name == "t-golden" and t.golden.backend == "torch" and t.golden.quant == "fp8-block"
    assert [s.name for s in cfg.servers()] == ["reference", "t", "t-golden", "t-golden-twin"]
    assert run.null == "twin" and t.twin is not None and t.twin.rounding_noise == "auto"
    assert cfg.target("t") is t


def test_golden_forms_and_sharing(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
        [run]
        prompts = ["p.jsonl"]
        whitebox = "off"
        [reference]
        model = "tiny-llama"
        [[target]]
        name = "a"
        model = "tiny-llama"
        quant = "int8"
        backend = "triton"
        faults = ["scale-skipped"]
        golden = "auto"
        [[target]]
        name = "b"
        model = "tiny-llama"
        quant = "int8"
        golden = "auto"
        [[target]]
        name = "c"
        url = "http://127.0.0.1:9000/v1"
        golden = { url = "http://127.0.0.1:9001" }
        [[target]]
        name = "d"
        command = "engine --port {port}"
        scheme = "mxfp4"
        [target.golden]
        name = "d-ref"
        command = "engine --port {port} --safe"
        [[target]]
        name = "e"
        model = "tiny-llama"
        golden = "none"
        debug = true
    """,
        )
    )
    a, b, c, d, e = cfg.targets
    assert a.golden is b.golden and a.golden.name == "a-golden"  # same spec apart from name: one server
    assert not a.server.debug and e.server.debug  # whitebox off; an explicit key wins
    assert c.golden.name == "c-golden" and c.golden.kind == "url" and c.scheme is None
    assert d.golden.name == "d-ref" and d.scheme == "mxfp4"
    assert e.golden is None and e.scheme == "none"
    assert [s.name for s in cfg.servers()] == [
        "reference",
        "a",
        "b",
        "c",
        "d",
        "e",
        "a-golden",
        "c-golden",
        "d-ref",
        "a-golden-twin",  # only a built-in golden has a rounding twin: c's and d's are external
    ]
    assert c.twin is None and d.twin is None and a.twin == b.twin


def test_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "cfg"
    sub.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "one.jsonl").write_text("{}\n")
    (tmp_path / "data" / "two.jsonl").write_text("{}\n")
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text("{}")  # an HF folder, as the shim loads
    (sub / "work").mkdir()  # the server's cwd: checked to be a folder, beside the config
    path = write(
        sub,
        """
        [run]
        prompts = ["../data", "p.jsonl"]
        output_dir = "../out"
        noise_floor = "floor.json"
        [reference]
        model = "../mymodel"
        cwd = "work"
        [[target]]
        model = "tiny-llama"
    """,
    )
    cfg = load_config(path)
    data = (tmp_path / "data").resolve()
    assert cfg.run.prompts == (data / "one.jsonl", data / "two.jsonl", (sub / "p.jsonl").resolve())
    assert cfg.run.output_dir == (tmp_path / "out").resolve()
    assert cfg.run.noise_floor == (sub / "floor.json").resolve()  # need not exist yet
    assert cfg.reference.model == str((tmp_path / "mymodel").resolve()) and cfg.reference.cwd == str(
        (sub / "work").resolve()
    )
    assert (
        cfg.targets[0].server.model == "tiny-llama" and cfg.targets[0].name == "target-1"
    )  # presets stay names


def test_thresholds_default_per_scheme_and_dotted(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            MINIMAL
            + """
        [thresholds]
        margin = 4
        exactness.kl_mean = 0.01
        [thresholds.fp8-block]
        kl_mean_max = 0.05
        accuracy.top1_agreement = 0.7
    """.replace("        ", ""),
        )
    )
    assert cfg.thresholds == {
        "default": {"margin": 4.0, "exactness.kl_mean": 0.01},
        "fp8-block": {"kl_mean_max": 0.05, "accuracy.top1_agreement": 0.7},
    }
    assert cfg.thresholds_for("fp8-block") == {
        "margin": 4.0, "exactness.kl_mean": 0.01, "kl_mean_max": 0.05, "accuracy.top1_agreement": 0.7,
    }  # fmt: skip
    assert cfg.thresholds_for(None) == {"margin": 4.0, "exactness.kl_mean": 0.01}


# ----------------------------------------------------------------------------- errors with lines

ERRORS = [
    # (config text, expected message after "x.toml:")
    (MINIMAL + 'quantt = "int8"\n', "12: [[target]] key 'quantt' is unknown; did you mean 'quant'?"),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nmax_tokens = "24"'),
        "3: [run] key 'max_tokens' must be an integer, got str '24'",
    ),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nlogprobs = 21'),
        "3: [run] key 'logprobs' must be in 1..20 (the continuation's tokens are read from the logprobs block), got 21",
    ),
    (  # the bootstrap's seed too: numpy raised on it after every request had been sent
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nseed = -1'),
        "3: [run] key 'seed' must be >= 0, got -1",
    ),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nconcurency = 2'),
        "3: [run] key 'concurency' is unknown; did you mean 'concurrency'?",
    ),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "nope.jsonl"'),
        "2: [run] prompts file 'nope.jsonl' does not exist",
    ),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nwhitebox = "yes"'),
        "3: [run] key 'whitebox' must be one of auto, off, on",
    ),
    (MINIMAL.replace('prompts = "p.jsonl"\n', ""), "1: [run] key 'prompts' is required"),
    (
        MINIMAL.replace('model = "tiny-llama"\nquant = "fp8-block"\ngolden = "auto"', 'url = "127.0.0.1:9"'),
        "9: [[target]] key 'url': '127.0.0.1:9' is not an http(s) URL",
    ),
    # accepted and never read (the worst class of bug): refused, saying what tokenizes instead
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\ntokenizer = "smollm2-135m"'),
        "3: [run] key 'tokenizer' is not supported: the pairs are tokenized by the servers themselves",
    ),
    # nan compared false both ways: error_rate_limit = nan silently turned the exit-3 check off
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nerror_rate_limit = nan'),
        "3: [run] key 'error_rate_limit' must be a finite number, got float nan",
    ),
    (
        MINIMAL.replace('prompts = "p.jsonl"', 'prompts = "p.jsonl"\nrequest_timeout_s = inf'),
        "3: [run] key 'request_timeout_s' must be a finite number, got float inf",
    ),
    (
        MINIMAL.replace(
            'model = "tiny-llama"\n\n[[target]]',
            'model = "tiny-llama"\nstartup_timeout_s = nan\n\n[[target]]',
            1,
        ),
        "[reference] key 'startup_timeout_s' must be a finite number, got float nan",
    ),
    (MINIMAL + "\n[targets]\nx = 1\n", "13: table [targets] is unknown; did you mean 'target'?"),
    (
        MINIMAL.replace("[reference]", "[referense]"),
        "4: table [referense] is unknown; did you mean 'reference'?",
    ),
    (
        MINIMAL.replace(
            'model = "tiny-llama"\n\n[[target]]', 'model = "tiny-llama"\nseed = 1.5\n\n[[target]]', 1
        ),
        "6: [reference] key 'seed' must be an integer, got float 1.5",
    ),
    (
        MINIMAL + '\n[[target]]\nname = "u"\nmodel = "tiny-llama"\nbackend = "cuda"\n',
        "16: [[target]] key 'backend' must be one of auto, torch, triton, vendor; got 'cuda'",
    ),
    (MINIMAL + 'expect = "FAIL"\n', '12: [[target]] key \'expect\' must be "pass" or "fail"'),
    (MINIMAL + 'scheme = "fp8_block"\n', "12: [[target]] key 'scheme' must be one of none, fp8-tensor"),
    (
        MINIMAL + 'faults = ["scale-transposed@model.layers.1.*", "fnuz"]\n',
        "12: [[target]] key 'faults': 'fnuz' is not a fault",
    ),
    (
        MINIMAL.replace('name = "t"', 'name = "reference"'),
        "8: [[target]] server name 'reference' is used twice",
    ),
    (
        MINIMAL + '\n[[target]]\nname = "t-golden"\nmodel = "tiny-llama"\n',
        "14: [[target]] server name 't-golden' is used twice",
    ),
    # a target named like a golden's rounding twin took the twin's place: the null, and every
    # exactness limit from it, came from the wrong server
    (
        MINIMAL + '\n[[target]]\nname = "t-golden-twin"\nmodel = "tiny-llama"\n',
        "14: [[target]] server name 't-golden-twin' is used twice",
    ),
    (
        MINIMAL.replace("[reference]\n", '[reference]\nname = "t-golden-twin"\n', 1),
        "the rounding twin of golden 't-golden' is named so",
    ),
    (
        MINIMAL.replace('golden = "auto"', 'golden = { model = "tiny-llama", quantt = "int8" }'),
        "11: [target.golden] key 'quantt' is unknown; did you mean 'quant'?",
    ),
    (
        MINIMAL.replace('golden = "auto"', '[target.golden]\nmodel = "tiny-llama"\ndebug = "yes"'),
        "13: [target.golden] key 'debug' must be true or false",
    ),
    (
        MINIMAL.replace('golden = "auto"', "golden = true"),
        '11: [[target]] key \'golden\' must be "auto", "none" or a server table',
    ),
    (
        MINIMAL.replace('model = "tiny-llama"\nquant = "fp8-block"', 'url = "http://h"'),
        "10: [[target]] server 't': golden = \"auto\" needs a built-in shim target",
    ),
    (
        MINIMAL.replace('model = "tiny-llama"\nquant', 'command = "e --port {port}"\nquant'),
        "10: [[target]] key 'quant' applies only to built-in shim",
    ),
    (
        MINIMAL.replace("[[target]]", "[target]"),
        "7: [target] targets are an array of tables: write [[target]]",
    ),
    (MINIMAL.split("[[target]]")[0], "needs at least one [[target]] table"),
    (MINIMAL.replace('[reference]\nmodel = "tiny-llama"\n', ""), "needs a [reference] table"),
    (
        MINIMAL + "\n[thresholds]\nkl_mean_maxx = 0.1\n",
        "14: [thresholds] metric 'kl_mean_maxx' is unknown; did you mean 'kl_mean_max'?",
    ),
    (
        MINIMAL + "\n[thresholds.fp8-block]\nkl_mean_max = -1\n",
        "14: [thresholds.fp8-block] key 'kl_mean_max' must be a finite number >= 0",
    ),
    (
        MINIMAL + "\n[thresholds]\nexactness.kl_meen = 0.1\n",
        "14: [thresholds.exactness] metric 'exactness.kl_meen' is unknown",
    ),
    (MINIMAL + "\n[thresholds.fp8-blok]\nmargin = 2\n", "13: [thresholds] scheme 'fp8-blok' is unknown"),
    (
        MINIMAL.replace('model = "tiny-llama"\nquant', 'model = "models/missing.gguf"\nquant'),
        "9: [[target]] model 'models/missing.gguf' is not one the shim loads (nothing is there at ",
    ),
    (
        MINIMAL.replace('[reference]\nmodel = "tiny-llama"', '[reference]\nmodel = "tiny-lama"'),
        "5: [reference] model 'tiny-lama' is not one the shim loads",
    ),
    (
        MINIMAL.replace('golden = "auto"', 'golden = { command = "engine --serve" }'),
        "11: [target.golden] the command has no {port} placeholder",
    ),
]


@pytest.mark.parametrize(("body", "expected"), ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_error_names_file_line_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:"), msg
    assert expected in msg, msg


@pytest.mark.parametrize(
    ("make", "seen"),
    [
        (lambda d: (d / "weights").mkdir(), "neither a .gguf file nor a folder with config.json"),
        (lambda d: (d / "weights").write_text("x"), "neither a .gguf file nor a folder with config.json"),
        (lambda d: None, "nothing is there"),
    ],
    ids=["folder-without-config.json", "file-not-gguf", "missing"],
)
def test_model_path_the_shim_cannot_load_is_refused_at_its_line(tmp_path: Path, make, seen: str) -> None:
    """The check took any existing path; the shim refused a folder without config.json (or a
    file that is no .gguf) only after every server had been launched (exit 3, no config line)."""
    make(tmp_path)
    path = write(tmp_path, MINIMAL.replace('model = "tiny-llama"\nquant', 'model = "weights"\nquant'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "9: [[target]] model '" in str(info.value)
    assert f"weights' is not one the shim loads ({seen}" in str(info.value)
    assert "use a preset (smollm2-135m, tiny-llama, tiny-moe), a .gguf file or an HF model folder" in str(
        info.value
    )


def test_model_paths_the_shim_loads_pass_and_tilde_is_expanded(tmp_path: Path, monkeypatch) -> None:
    """A `.gguf` file and a folder with config.json pass; `~` is read as the shim reads it (the
    check had looked for a literal '~' folder beside the config and refused a good path)."""
    home = tmp_path / "home"
    (home / "hf").mkdir(parents=True)
    (home / "hf" / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("HOME", str(home))
    body = MINIMAL.replace('model = "tiny-llama"\nquant', 'model = "~/hf"\nquant')
    body = body.replace('[reference]\nmodel = "tiny-llama"', '[reference]\nmodel = "m.gguf"')
    cfg = load_config(write(tmp_path, body))
    assert cfg.reference.model == str((tmp_path / "m.gguf").resolve())
    assert cfg.targets[0].server.model == str((home / "hf").resolve())


def test_second_target_error_points_at_its_own_line(tmp_path: Path) -> None:
    body = MINIMAL + '\n[[target]]\nname = "u"\nmodel = "tiny-llama"\nquantt = "int8"\n'
    with pytest.raises(ConfigError, match=r"x\.toml:16: \[\[target\]\] key 'quantt'"):
        load_config(write(tmp_path, body))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.toml: invalid TOML: "):
        load_config(write(tmp_path, "[run]\nprompts = [\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_metric_names_checked_only_when_verdict_publishes_them(tmp_path: Path, monkeypatch) -> None:
    fake = types.ModuleType("difftest.verdict")
    fake.THRESHOLD_KEYS = frozenset({"only_this"})
    monkeypatch.setitem(sys.modules, "difftest.verdict", fake)
    with pytest.raises(
        ConfigError, match=r"x\.toml:14: \[thresholds\] metric 'kl_mean_max' is unknown \(known: only_this\)"
    ):
        load_config(write(tmp_path, MINIMAL + "\n[thresholds]\nkl_mean_max = 1\n"))
    fake.THRESHOLD_KEYS = frozenset()
    cfg = load_config(write(tmp_path, MINIMAL + "\n[thresholds]\nanything = 1\n"))
    assert cfg.thresholds == {"default": {"anything": 1.0}}


def test_model_presets_match_the_shim() -> None:
    from difftest.config import MODEL_PRESETS

    models = pytest.importorskip("server_shim.models")
    assert models.PRESETS == MODEL_PRESETS


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (('model = "tiny-llama"\nquant', 'model = "no/such/model"\nquant'), 9),
        (('model = "tiny-llama"\nquant = "fp8-block"\ngolden = "auto"', 'command = "engine --serve"'), 9),
    ],
)
def test_launch_mistakes_are_exit_2_before_anything_starts(
    tmp_path: Path, change: tuple[str, str], line: int, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Issue 10: a missing model path exited 3 after launching servers, naming no config line; a
    command without {port} was exit 3 too."""
    from difftest import runner
    from difftest.cli import main

    started: list[object] = []
    monkeypatch.setattr(runner, "launch_shown", lambda *a, **k: started.append(a))
    path = write(tmp_path, MINIMAL.replace(*change))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difftest: error: {path}:{line}: [[target]] ") and err.count("\n") == 1
    assert started == []


def test_thresholds_file_is_parsed_like_the_config(tmp_path: Path) -> None:
    """`report --thresholds` used its own dialect: it refused the documented `[thresholds]
    kl_mean_max = ...` form and accepted the typo `kl_mean_maxx`. One parser now."""
    from difftest.config import load_thresholds

    f = tmp_path / "t.toml"
    f.write_text(
        "[thresholds]\nkl_mean_max = 0.05\nexactness.kl_mean = 0.01\n[thresholds.fp8-block]\ntop1_min = 0.7\n"
    )
    assert load_thresholds(f) == {
        "default": {"kl_mean_max": 0.05, "exactness.kl_mean": 0.01},
        "fp8-block": {"top1_min": 0.7},
    }
    f.write_text("[fp8-block]\ntoken_match_min = 0.999\n")  # the table's body alone
    assert load_thresholds(f) == {"fp8-block": {"token_match_min": 0.999}}
    f.write_text("[thresholds]\nkl_mean_maxx = 0.05\n")
    with pytest.raises(ConfigError, match=r"t\.toml:2.*kl_mean_maxx.*did you mean 'kl_mean_max'"):
        load_thresholds(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_thresholds(tmp_path / "missing.toml")
    f.write_text("[run]\nseed = 3\n[fp8-block]\ntop1_min = 0.7\n")  # a run config without [thresholds]
    with pytest.raises(
        ConfigError, match=r"t\.toml:1: a thresholds file holds only \[thresholds\]; 'run' is not"
    ):
        load_thresholds(f)  # was "scheme 'run' is unknown"


def test_a_config_that_is_not_utf8_is_a_config_error_and_a_bom_is_fine(tmp_path: Path) -> None:
    """The bug: a Latin-1 config (or thresholds file) was a UnicodeDecodeError traceback; a BOM was
    'invalid TOML' at line 1."""
    from difftest.config import load_thresholds

    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(
        MINIMAL.replace('model = "tiny-llama"', 'model = "tiny-llama" # caf\xe9', 1).encode("latin-1")
    )
    with pytest.raises(ConfigError, match=r"latin1.toml:6: not UTF-8 text \(byte 0xe9\)"):
        load_config(latin1)
    (tmp_path / "t.toml").write_bytes(b"kl_mean_max = 0.05 # \xe9\n")
    with pytest.raises(ConfigError, match=r"t.toml:1: not UTF-8 text"):
        load_thresholds(tmp_path / "t.toml")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(bom).targets[0].name == "t"


def test_a_bare_thresholds_file_names_the_line(tmp_path: Path) -> None:
    """A thresholds file that is only the table's body named no line (the README promises one)."""
    from difftest.config import load_thresholds

    f = tmp_path / "t.toml"
    f.write_text("kl_mean_max = 0.05\nkl_mean_mx = 0.1\n")
    with pytest.raises(
        ConfigError, match=r"t.toml:2: metric 'kl_mean_mx' is unknown; did you mean 'kl_mean_max'"
    ):
        load_thresholds(f)


def test_noise_takes_a_config_with_no_targets(tmp_path: Path) -> None:
    """`noise` measures the reference alone, so its config needs no [[target]]; `run` still does."""
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL.split("[[target]]")[0])
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    cfg = load_config(path, require_targets=False)
    assert cfg.targets == () and cfg.reference.name == "reference"
    with pytest.raises(ConfigError, match=r"needs at least one \[\[target\]\] table"):
        load_config(path)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ('faults = ["slot-variant"]\nbatch_invariant = true', "fault slot-variant would change nothing"),
        (
            'faults = ["slot-tile"]\nextra_args = ["--max-batch-size", "8"]',
            "--max-batch-size 8 never fills it",
        ),
        ('extra_args = ["--bogus"]', "unrecognized arguments: --bogus"),
        ('ck_free = true\nbackend = "vendor"', "--backend vendor contradicts --ck-free"),
    ],
    ids=[
        "slot-fault-batch-invariant",
        "slot-tile-eight-slots-in-extra-args",
        "unknown-flag",
        "vendor-ck-free",
    ],
)
def test_a_shim_that_would_refuse_its_flags_is_a_config_line_before_anything_starts(
    tmp_path: Path, extra: str, said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the config parsed, the reference and the other servers started, and only then did this
    server exit 2 at launch (the shim's own refusals, server_shim.option_rules)."""
    from difftest import runner
    from difftest.cli import main

    started: list[object] = []
    monkeypatch.setattr(runner, "launch_shown", lambda *a, **k: started.append(a))
    path = write(tmp_path, MINIMAL.replace('golden = "auto"', extra))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difftest: error: {path}:7: [[target]] the shim would refuse to start: ")
    assert said in err and err.count("\n") == 1
    assert started == []


def test_the_reference_with_a_backend_and_no_quant_is_refused_at_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace('model = "tiny-llama"\n\n', 'model = "tiny-llama"\nbackend = "triton"\n\n', 1),
    )
    with pytest.raises(
        ConfigError, match=r"x\.toml:4: \[reference\] the shim would refuse to start: --backend triton"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('dtype = "float64"', "unknown dtype 'float64': use auto, float32, bfloat16 or float16"),
        ('device = "gpu"', "unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
        ('device = "cuda:01"', "unknown device 'cuda:01': use auto, cpu, cuda or cuda:N"),
        ('rounding_noise = "autoo"', "--rounding-noise must be 'auto' or a number in [0, 1), got 'autoo'"),
        ('rounding_noise = "1.5"', "--rounding-noise must be 'auto' or a number in [0, 1), got '1.5'"),
    ],
    ids=["dtype", "device", "device-index", "noise-word", "noise-range"],
)
def test_a_value_the_shim_refuses_at_load_is_its_config_line_before_anything_starts(
    tmp_path: Path, line: str, said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: accepted; the run launched every server and the shim refused at model load, a minute
    later, naming the server and not the line (server_shim.option_rules.refuse_bad_values)."""
    from difftest import runner
    from difftest.cli import main

    started: list[object] = []
    monkeypatch.setattr(runner, "launch_shown", lambda *a, **k: started.append(a))
    path = write(tmp_path, MINIMAL.replace('quant = "fp8-block"', f'quant = "fp8-block"\n{line}'))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"difftest: error: {path}:11: [[target]] the shim would refuse to start: {said}\n"
    assert started == []


@pytest.mark.parametrize(
    "line", ['dtype = "bf16"', 'device = "cuda:3"', 'device = "cuda"', 'rounding_noise = "auto"']
)
def test_values_only_the_machine_can_judge_pass_the_config_check(tmp_path: Path, line: str) -> None:
    """Whether cuda:3 exists is the launch's question (a config is checked anywhere, without torch)."""
    cfg = load_config(
        write(tmp_path, MINIMAL.replace('model = "tiny-llama"\n\n', f'model = "tiny-llama"\n{line}\n\n', 1))
    )
    key, value = (part.strip().strip('"') for part in line.split("="))
    assert getattr(cfg.reference, key) == value


def test_the_config_check_stays_torch_free(tmp_path: Path) -> None:
    """The value rules are server_shim.option_rules', not models.py's: loading a config imports no torch."""
    path = write(
        tmp_path,
        MINIMAL.replace('model = "tiny-llama"\n\n', 'model = "tiny-llama"\ndtype = "float64"\n\n', 1),
    )
    code = (
        "import sys\nfrom difftest.config import load_config\nfrom difftest.errors import ConfigError\n"
        f"try:\n    load_config({str(path)!r})\nexcept ConfigError as exc:\n    print(exc)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.splitlines() == [
        f"{path}:6: [reference] the shim would refuse to start: unknown dtype 'float64': use auto, "
        "float32, bfloat16 or float16",
        "False",
    ]


COMMAND_WITH_CWD = """
[run]
prompts = "p.jsonl"

[reference]
url = "http://127.0.0.1:9"

[[target]]
name = "t"
command = "{python} -m server_shim serve --model tiny-llama --port {port}"
cwd = "CWD"
"""


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_cwd_that_is_no_folder_is_its_config_line(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: accepted; the launch then said "cannot run '<python>': No such file or directory" (exit
    3), blaming the interpreter. Relative, it is looked for beside the config, not where one runs."""
    from difftest import runner
    from difftest.cli import main

    started: list[object] = []
    monkeypatch.setattr(runner, "launch_shown", lambda *a, **k: started.append(a))
    sub = tmp_path / "cfg"
    sub.mkdir()
    (tmp_path / "work").mkdir()  # where one runs from: not where a relative cwd is looked for
    if kind == "file":
        (sub / "work").write_text("")
    monkeypatch.chdir(tmp_path)
    path = write(sub, COMMAND_WITH_CWD.replace("CWD", "work"))
    assert main(["run", str(path)]) == 2
    why = "it is a file" if kind == "file" else "no such folder"
    assert capsys.readouterr().err == (
        f"difftest: error: {path}:10: [[target]] key 'cwd': {str(sub / 'work')!r} is not a folder to start "
        f"the server in ({why})\n"
    )
    assert started == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ('{ DIFFTEST_CK_FRE = "1" }', "key 'env.DIFFTEST_CK_FRE': DIFFTEST_CK_FRE is no variable the shim reads; "
         "did you mean DIFFTEST_CK_FREE?"),
        ('{ DIFFTEST_CK_FREE = "enabled" }', "the shim would refuse to start: DIFFTEST_CK_FREE='enabled' is neither on"),
        ('{ DIFFTEST_TRITON_KERNELS = "fastest" }', "DIFFTEST_TRITON_KERNELS='fastest' must be one of fast, legacy"),
    ],
    ids=["misspelt-name", "bad-switch-value", "bad-choice"],
)  # fmt: skip
def test_shim_env_table_is_checked_at_its_line(tmp_path: Path, env: str, expected: str) -> None:
    """A misspelt DIFFTEST_* name was read as unset (CK_FREE off, no word); a bad value stopped the
    shim only after launch (exit 3)."""
    body = MINIMAL.replace('golden = "auto"', f'golden = "auto"\nenv = {env}')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body))
    assert "12: [[target]] " in str(info.value), str(info.value)
    assert expected in str(info.value)


def test_shim_switch_from_difftests_environment_is_named_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFTEST_CUDA_GRAPHS", "maybe")
    with pytest.raises(
        ConfigError, match=r"DIFFTEST_CUDA_GRAPHS='maybe' is neither on .*\(set in difftest's environment\)"
    ):
        load_config(write(tmp_path, MINIMAL))
    monkeypatch.setenv("DIFFTEST_CUDA_GRAPHS", "off")
    body = MINIMAL.replace(
        'golden = "auto"', 'golden = "auto"\nenv = { DIFFTEST_CK_FREE = "1", OTHER = "x" }'
    )
    assert load_config(write(tmp_path, body)).targets[0].server.env == {"DIFFTEST_CK_FREE": "1", "OTHER": "x"}
