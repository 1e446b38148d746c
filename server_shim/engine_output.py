"""What a sampled token turns into: its piece of text, stop-string cuts, the SeqEvent sent.

Runs on the model thread after the next decode step was launched, so detokenizing and stop
matching overlap the device's work instead of adding to each step.
"""

from __future__ import annotations

from server_shim.detok import TokenInfo
from server_shim.engine_types import Seq, SeqEvent

__all__ = ["accept", "stop_overlap"]


def accept(s: Seq, info: TokenInfo | None, reason: str | None, add_text: bool = True, tail: str = "") -> None:
    """Add a token's piece to the text, cut at the first stop string, emit the event. `add_text`
    False: the token (EOS) adds no text, only `tail`, text still held back that the end releases."""
    if reason is not None and info is not None and add_text:
        rest = s.detok.flush()
        if rest:
            info = TokenInfo(info.token_id, info.text + rest, info.logprob, info.top)
    end = None
    added = info.text if info is not None and add_text else tail
    if (info is not None and add_text) or tail:  # an empty piece still holds back a stop's prefix
        before = len(s.text)
        s.text += added
        stops = s.params.stop
        if stops:
            start = max(0, before - max(len(x) for x in stops) + 1)
            hits = [h for h in (s.text.find(x, start) for x in stops) if h >= 0]
            if hits:
                s.text, reason = s.text[: min(hits)], "stop"
            elif reason is None:  # hold back a suffix that may still grow into a stop string
                end = len(s.text) - max(stop_overlap(s.text, x) for x in stops)
    end = len(s.text) if end is None else end
    text = s.text[s.released : end]
    s.released = max(s.released, end)
    s.finished = s.finished or reason is not None
    s.emitted = True
    s.handle._put(SeqEvent(s.index, (info,) if info is not None else (), text, reason))


def stop_overlap(text: str, stop: str) -> int:
    """The longest k < len(stop) with text ending in stop[:k]: how much text to hold back.

    Only positions where stop holds text's last character can end such a prefix, so this tries
    those (str.find, in C) instead of every k — a few candidates instead of len(stop) slices per
    token, which with the caps on stop strings keeps matching cheap on the model thread."""
    if not text:
        return 0
    last, best = text[-1], 0
    i = stop.find(last, 0, len(stop) - 1)
    while i >= 0:
        if text.endswith(stop[: i + 1]):
            best = i + 1
        i = stop.find(last, i + 1, len(stop) - 1)
    return best
