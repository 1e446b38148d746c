"""The rounding twin: the golden with a correct kernel's worth of error in every module.

Exactness needs a null model for "a different but correct implementation on this hardware". The
golden asked twice is not one (a deterministic torch golden agrees with itself exactly, and then
any other correct kernel looks like a bug). The twin is the golden with every linear / MoE output
multiplied by (1 + a·h), h uniform in [-1, 1): by default a = `module_tolerance(dtype, K)` for a
module of reduction length K (server_shim.tolerance), half the differ's module replay bound.
Compared with the golden it shows what that much per-module error does end to end (token flips,
KL, accumulated residual error) on this model, scheme, dtype and device; the limits come from it.

h is a hash of each output element's own value and the seed, not a random draw: like a real
kernel the twin is deterministic and batch-invariant (the same row gives the same answer in any
batch slot), so it adds no slot noise of its own.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from server_shim.option_rules import rounding_noise_amplitude
from server_shim.tolerance import DEFAULT_K, module_tolerance

logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B1
_MIX = 0x45D9F3B
_MASK = 0xFFFFFFFF


def value_hash_uniform(y: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 tensor in [-1, 1), a deterministic function of each element of `y` and `seed`."""
    bits = y.detach().float().contiguous().view(torch.int32).to(torch.int64) & _MASK
    # the seed's term reduced in Python first: the same low 32 bits, and a scalar torch takes (it
    # refused one past 2**64: a module seed's, seed * 1_000_003 + i, from --seed 11087 on)
    h = (bits * _GOLDEN + ((seed * 0x632BE5AB) & _MASK)) & _MASK
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK
    h = h ^ (h >> 16)
    return (h.to(torch.float64) / 2.0**31 - 1.0).to(torch.float32)


def perturb(y: torch.Tensor, amplitude: float, seed: int) -> torch.Tensor:
    noisy = y.float() * (1.0 + amplitude * value_hash_uniform(y, seed))
    return noisy.to(y.dtype)


def _is_perturbed(module: nn.Module) -> bool:
    # the quantized modules keep nn.Linear's role under their own class (server_shim.quant)
    return isinstance(module, nn.Linear) or type(module).__name__ in ("QuantLinear", "QuantMoEExperts")


def _reduction_length(module: nn.Module) -> int:
    return int(getattr(module, "in_features", None) or DEFAULT_K)


def resolve_amplitude(value: str | float) -> float | None:
    """`auto` -> None (each module's own module_tolerance(dtype, K)); a number -> itself (0 = off).
    The rule is option_rules', which difftest's config check runs on a server table too."""
    return rounding_noise_amplitude(value)


def apply_rounding_twin(
    model: nn.Module, amplitude: float | None, seed: int = 0, dtype: str = "float32"
) -> float:
    """Hook every linear / MoE module's output with noise of `amplitude` (None: each module's
    `module_tolerance(dtype, K)`); returns the largest amplitude applied (0: nothing hooked)."""
    if amplitude is not None and amplitude <= 0:
        return 0.0
    largest, count = 0.0, 0
    for index, module in enumerate(model.modules()):
        if not _is_perturbed(module):
            continue
        a = amplitude if amplitude is not None else module_tolerance(dtype, _reduction_length(module))
        module_seed = seed * 1_000_003 + index  # modules differ: no shared pattern across layers

        def hook(_mod: nn.Module, _inp: object, out: object, s: int = module_seed, a: float = a) -> object:
            return perturb(out, a, s) if isinstance(out, torch.Tensor) else out

        module.register_forward_hook(hook)
        largest, count = max(largest, a), count + 1
    logger.info("rounding twin: relative noise up to %.3g on %d modules", largest, count)
    return largest
