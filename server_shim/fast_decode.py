"""A faster `decode` for the engine's detokenizing: straight to the Rust tokenizer.

Every generated token is decoded a few times (its piece, and one per top-k alternative:
detok.py). Through transformers' `decode` / `batch_decode` each call costs ~20 us of Python
argument handling around a ~5 us Rust call; at batch 128 that alone is several ms per step, more
than the GPU's step. `tokenizers.Tokenizer.decode` gives the same strings for a fast tokenizer
with `clean_up_tokenization_spaces=False` (what detok.py asks for); `backend_decoder` checks that
on probe ids at start and otherwise keeps the HF tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["BackendDecoder", "backend_decoder"]


class BackendDecoder:
    """The methods IncrementalDetokenizer / decode_prompt call, on the Rust tokenizer."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:  # fmt: skip
        assert not clean_up_tokenization_spaces  # only the form detok.py uses
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self,
        seqs: list[list[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        assert not clean_up_tokenization_spaces
        # one `decode` per sequence, not `decode_batch`: that one fans the few short sequences of a
        # token's piece and alternatives out over rayon's thread pool, whose wake-ups cost more than
        # the decoding (bench/detok.py: 2x slower idle, 4-6x with another process on the cores)
        decode = self._backend.decode
        return [decode(ids, skip_special_tokens=skip_special_tokens) for ids in seqs]

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        """One token's vocabulary entry (detok.token_bytes reads a token's own bytes from it)."""
        return self._backend.id_to_token(token_id)


def backend_decoder(tokenizer: Any) -> Any:
    """A BackendDecoder when it decodes probe ids exactly as `tokenizer` does, else `tokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return tokenizer
    fast = BackendDecoder(backend)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0) + len(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    probes = [[], [0], list(range(min(vocab, 64)))]
    probes += [[(i * 7919 + j * 104729) % max(vocab, 1) for j in range(12)] for i in range(24)]
    probes += [[t] for t in sorted(getattr(tokenizer, "all_special_ids", []) or [])]
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    try:
        same = tokenizer.batch_decode(probes, **kw) == fast.batch_decode(probes, **kw)
    except Exception as exc:  # noqa: BLE001 - any doubt: keep the HF path
        logger.info("fast decode not used: %r", exc)
        return tokenizer
    if not same:
        logger.info("fast decode not used: the Rust tokenizer decodes probe ids differently")
        return tokenizer
    return fast
