"""Incremental detokenization: per-token pieces of text that concatenate exactly to the decoded text.

The engine turns each sampled token into a
piece here, and `decode_prompt` builds the echo of a prompt with its teacher-forced logprobs.
Pieces that concatenate to the text are what make `text_offset` and streamed chunks line up.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "IncrementalDetokenizer",
    "TokenInfo",
    "bytes_label",
    "decode_prompt",
    "label_bytes",
    "token_bytes",
]


# Tokens of left context when decoding a piece: SentencePiece drops a leading space and byte-level
# BPE splits a character over tokens, so a token decoded alone is not its contribution to the text.
_CONTEXT = 5
# Most context tokens replayed when the context ends inside a character (vLLM V1 primes with up to
# 23, else the whole prompt; a character's bytes span at most 4 tokens, so the last release is near).
_PRIME = 24


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    text: str  # this token's piece of the text; pieces concatenate to the text
    logprob: float | None = None  # None: not asked for, or the first prompt token
    # (id, label, logprob), best first. The label is the piece the alternative would have added;
    # where that is empty (part of a UTF-8 character, held back) it is OpenAI's "bytes:\xNN..." of
    # the token's own bytes, so alternatives that are partial characters keep keys of their own
    top: tuple[tuple[int, str, float], ...] | None = None


_BYTES_LABEL = re.compile(r"bytes:((?:\\x[0-9a-f]{2})+)")


def bytes_label(raw: bytes) -> str:
    """OpenAI's label of a token that is not whole UTF-8 text: "bytes:\\xe6\\x97"."""
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def label_bytes(label: str) -> list[int]:
    """The UTF-8 bytes a label stands for: a "bytes:" label's own bytes, else the text's."""
    m = _BYTES_LABEL.fullmatch(label)
    if m is None:
        return list(label.encode())
    return list(bytes.fromhex(m.group(1).replace("\\x", "")))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> bytes (GPT-2's table, as transformers has it)."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # moved in some release: labels fall back to the decoded text
        return {}
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """One token's own bytes: byte-level BPE through its byte table, SentencePiece's <0xNN> byte
    tokens, else the token decoded alone (lossy where it is part of a character)."""
    name = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(name, str):
        if len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
            with contextlib.suppress(ValueError):
                return bytes([int(name[3:5], 16)])
        table = _byte_decoder()
        if name and all(c in table for c in name):
            return bytes(table[c] for c in name)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode()


class IncrementalDetokenizer:
    """vLLM-style incremental detokenization: a token's piece is decode(window + [t]) minus
    decode(window). A piece that ends in an incomplete UTF-8 character (U+FFFD) is held back and
    released with the token that completes it, so pieces always concatenate to the decoded text."""

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids = list(context[-_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prev = self._decode(self._ids)
        self._held = 0  # tokens pushed since the last piece released: what flush() may release
        if self._prev.endswith("\ufffd"):
            self._prime(context[-_PRIME:])

    def _prime(self, tail: Sequence[int]) -> None:
        """The context ends inside a character: replay its tail token by token, as vLLM V1 primes
        its DecodeStream with the prompt, so that character's bytes stay unread and the token that
        completes it releases the whole character. Seeded as read, the character was lost: the
        completing token's text was no longer than the context's, so its piece was empty."""
        self._ids, self._prefix, self._read, self._prev = [], 0, 0, ""
        for t in tail:
            text = self._decode(self._ids[self._prefix :] + [t])
            self._ids.append(t)
            if self._piece(text):
                self._advance()

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _piece(self, text: str) -> str:
        return "" if text.endswith("\ufffd") else text[len(self._prev) :]

    def push(self, token: int, logprob: float | None, alts: list[tuple[int, float]] | None) -> TokenInfo:
        window = self._ids[self._prefix :]
        cands = [token] + [a for a, _ in alts or ()]
        texts = self._tok.batch_decode(
            [window + [c] for c in cands], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        piece = self._piece(texts[0])
        top = None
        if alts is not None:
            top = tuple(
                (a, self._label(a, token, piece, t), v) for (a, v), t in zip(alts, texts[1:], strict=True)
            )
        self._ids.append(token)
        self._held += 1
        if piece:
            self._advance()
        return TokenInfo(token, piece, logprob, top)

    def _advance(self) -> None:
        """A piece was released: the window moves past it (vLLM's prefix and read offsets)."""
        self._prefix, self._read = self._read, len(self._ids)
        self._prev = self._decode(self._ids[self._prefix : self._read])
        self._held = 0
        if self._prefix > 4 * _CONTEXT:  # keep the id list short on long generations
            del self._ids[: self._prefix - _CONTEXT]
            self._read -= self._prefix - _CONTEXT
            self._prefix = _CONTEXT

    def _label(self, alt: int, chosen: int, chosen_piece: str, text: str) -> str:
        """An alternative's label: the chosen token's own piece where it is the chosen token (a
        client finds the chosen token among them by it), else its piece, else its bytes."""
        if alt == chosen:
            return chosen_piece
        return self._piece(text) or bytes_label(token_bytes(self._tok, alt))

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end). Bytes of the context
        alone are not this text's: with nothing pushed since, nothing is released."""
        if self._held == 0:
            return ""
        return self._decode(self._ids[self._prefix :])[len(self._prev) :]


def decode_prompt(
    tokenizer: Any, prompt: list[int], logits: torch.Tensor | None, k: int | None
) -> tuple[tuple[TokenInfo, ...], str]:
    """Echo: pieces of the prompt and, with logits [L-1, V] (position j-1 predicts token j), the
    teacher-forced logprobs; the first token has none (no context predicts it)."""
    det = IncrementalDetokenizer(tokenizer, [])
    lp_rows = top_v = top_i = None
    if logits is not None and len(prompt) > 1:
        lp = torch.log_softmax(logits.float(), dim=-1)  # [L-1, V]
        lp_rows = lp.gather(1, torch.tensor(prompt[1:], device=lp.device).unsqueeze(1)).squeeze(1).tolist()
        if k:
            top_v, top_i = (t.tolist() for t in torch.topk(lp, k, dim=-1))
    infos = []
    for j, t in enumerate(prompt):
        if j == 0 or lp_rows is None:
            infos.append(det.push(t, None, None))
        else:
            alts = list(zip(top_i[j - 1], top_v[j - 1], strict=True)) if top_i is not None else []
            infos.append(det.push(t, lp_rows[j - 1], alts))
    rest = det.flush()
    if rest:
        infos[-1] = TokenInfo(infos[-1].token_id, infos[-1].text + rest, infos[-1].logprob, infos[-1].top)
    return tuple(infos), "".join(i.text for i in infos)
