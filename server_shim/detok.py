"""Incremental detokenization: per-token pieces of text that concatenate exactly to the decoded text.

The engine turns each sampled token into a
piece here, and `decode_prompt` builds the echo of a prompt with its teacher-forced logprobs.
Pieces that concatenate to the text are what make `text_offset` and streamed chunks line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["IncrementalDetokenizer", "TokenInfo", "decode_prompt"]


# Tokens of left context when decoding a piece: SentencePiece drops a leading space and byte-level
# BPE splits a character over tokens, so a token decoded alone is not its contribution to the text.
_CONTEXT = 5


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    text: str  # this token's piece of the text; pieces concatenate to the text
    logprob: float | None = None  # None: not asked for, or the first prompt token
    top: tuple[tuple[int, str, float], ...] | None = None  # (id, piece, logprob), best first


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
            top = tuple((a, self._piece(t), v) for (a, v), t in zip(alts, texts[1:], strict=True))
        self._ids.append(token)
        if piece:
            self._prefix, self._read = self._read, len(self._ids)
            self._prev = self._decode(self._ids[self._prefix : self._read])
            if self._prefix > 4 * _CONTEXT:  # keep the id list short on long generations
                del self._ids[: self._prefix - _CONTEXT]
                self._read -= self._prefix - _CONTEXT
                self._prefix = _CONTEXT
        return TokenInfo(token, piece, logprob, top)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        if self._read == len(self._ids):
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
