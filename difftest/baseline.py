"""A stored reference: the reference server's answers recorded once, judged against any number of
targets later (llama-perplexity's `--kl-divergence-base` habit).

Why a recording of HTTP exchanges and not a table of parsed numbers: the pipeline then reads the
baseline through the very code it reads a live reference with (conformance probe, generation,
teacher forcing, batch-slot check, scoring), so a baseline gives the same verdict and the same
numbers as the live reference would — there is no second parser to drift. The recording is made
by an httpx transport around the live connection (`RecordingTransport`) and answered by another
(`ReplayTransport`); `CompletionClient` is the same on both.

The file is JSON, gzip-compressed, versioned (`FORMAT`, `VERSION`):

    format, version, created_at
    reference        name, url and the model it served (the id the replay asks for), failed
                     generations and the ids of their prompts
    settings         max_tokens, logprobs, seed, endpoint: what every request depended on
    prompts          id, prompt, max_tokens (and messages for chat, tags where given) of every
                     prompt recorded
    tokenizer        served model, vocabulary size, the probe texts' tokenizations
    capabilities     the probe's table and fields (what the reference could do)
    signature        difftest and library versions that recorded it; batch_slot_check and
                     batch_slot_draws: whether the batch-slot check was recorded, and how often
    exchanges        [{method, path, body, responses: [{status, content_type, body}]}]

A baseline is black-box only: the debug routes are not recorded (white-box checks need a live
reference). A run whose prompts, settings or endpoint differ from the recording, or that runs the
batch-slot check the recording left out or on another first prompt, is refused (exit 2) before
any server starts, as is a file whose exchanges are damaged or hold no answer to a recorded
prompt; a target whose tokenizer differs is refused by the same pair check as with a live
reference. A replay never tokenizes another server's text (it holds no such answers:
difftest.retokenize.plan), and a request it cannot answer anyway is named (`ReplayTransport.notes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import json
import logging
import os
import secrets
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from difftest.errors import OutputError, UsageError, first_invalid, output_error
from difftest.prompts import Prompt

log = logging.getLogger(__name__)

FORMAT = "difftest-baseline"
VERSION = 1
SUFFIX = ".json.gz"
SETTINGS_KEYS = ("max_tokens", "logprobs", "seed", "endpoint")
_NOT_RECORDED = b'{"error": {"message": "not recorded in the baseline", "type": "not_found"}}'


def request_key(method: str, path: str, content: bytes) -> str:
    """One key per distinct request: JSON bodies compared by value (key order does not matter)."""
    body: Any = None
    if content:
        try:
            body = json.loads(content)
        except ValueError:
            body = content.decode("latin-1")
    return json.dumps([method.upper(), path, body], sort_keys=True, separators=(",", ":"))


class RecordedResponse(BaseModel):
    """One answer as ReplayTransport serves it back."""

    model_config = ConfigDict(strict=True)
    status: Annotated[int, Field(ge=100, le=599)]
    content_type: str
    body: str


class RecordedExchange(BaseModel):
    """One distinct request and every answer it got (at least one: that is why it is recorded)."""

    model_config = ConfigDict(strict=True)
    method: str
    path: str
    body: Any  # the request's JSON body, None for none
    responses: Annotated[list[RecordedResponse], Field(min_length=1)]


_EXCHANGES: TypeAdapter[list[RecordedExchange]] = TypeAdapter(list[RecordedExchange])


def recorded_exchanges(items: Any) -> list[RecordedExchange]:
    """`items` checked as the replay will read them, so a damaged exchange is a ValueError naming it
    now (`exchanges[3].responses[0].status: Field required`), not a KeyError once servers are up."""
    try:
        return _EXCHANGES.validate_python(items)
    except ValidationError as exc:
        raise ValueError(first_invalid(exc, "exchanges")) from None


@dataclass
class Exchanges:
    """request key -> the responses given to it, in order (a repeated request may differ)."""

    table: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, key: str, status: int, content_type: str, body: bytes) -> None:
        self.table[key].append({"status": status, "content_type": content_type, "body": body.decode()})

    def to_list(self) -> list[dict[str, Any]]:
        out = []
        for key, responses in self.table.items():
            method, path, body = json.loads(key)
            out.append({"method": method, "path": path, "body": body, "responses": responses})
        return out

    @classmethod
    def from_list(cls, items: Sequence[Mapping[str, Any]]) -> Exchanges:
        """The file's `exchanges`, checked (ValueError) before anything is kept."""
        ex = cls()
        for item in recorded_exchanges(items):
            content = b"" if item.body is None else json.dumps(item.body).encode()
            ex.table[request_key(item.method, item.path, content)] = [r.model_dump() for r in item.responses]
        return ex


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards to the live server and keeps every exchange; /debug routes are answered 404
    here (never forwarded) so that the recorded reference is the black-box server it replays as."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.exchanges = Exchanges()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        if request.url.path.startswith("/debug"):
            return httpx.Response(404, content=_NOT_RECORDED, headers={"content-type": "application/json"})
        resp = await self.inner.handle_async_request(request)
        body = await resp.aread()
        await resp.aclose()
        ctype = resp.headers.get("content-type", "application/json")
        if request.url.path != "/health":
            self.exchanges.add(
                request_key(request.method, request.url.path, content), resp.status_code, ctype, body
            )
        return httpx.Response(resp.status_code, content=body, headers={"content-type": ctype})

    async def aclose(self) -> None:
        await self.inner.aclose()


class ReplayTransport(httpx.AsyncBaseTransport):
    """Answers from the recording: the n-th identical request gets the n-th recorded answer (the
    last one again after that, counted in `repeats`: such an answer is no new draw of the server);
    a request never recorded is a 404 naming the baseline, counted in `missed` (see `notes`)."""

    def __init__(self, exchanges: Exchanges) -> None:
        self.exchanges = exchanges
        self._seen: dict[str, int] = defaultdict(int)
        self._lock = asyncio.Lock()
        self.misses = 0
        self.repeats = 0
        self.missed: dict[str, int] = {}  # "POST /tokenize" -> how many such requests missed
        self.first_missed: dict[str, str] = {}  # "POST /tokenize" -> the first one's body, cut short

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        key = request_key(request.method, request.url.path, content)
        responses = self.exchanges.table.get(key)
        if not responses:
            self._miss(request.method, request.url.path, content)
            return httpx.Response(404, content=_NOT_RECORDED, headers={"content-type": "application/json"})
        async with self._lock:
            i = min(self._seen[key], len(responses) - 1)
            self._seen[key] += 1
            if self._seen[key] > len(responses):
                self.repeats += 1
                log.debug("baseline: %s %s asked more often than recorded", request.method, request.url.path)
        r = responses[i]
        return httpx.Response(
            r["status"], content=r["body"].encode(), headers={"content-type": r["content_type"]}
        )

    def _miss(self, method: str, path: str, content: bytes) -> None:
        """Count a request the recording cannot answer. Its 404 is no answer of the reference, so
        whatever rests on it (a text left untokenized, a slot draw "refused") would be passed off
        as the reference's: said at once on the terminal and kept for the report (`notes`). The
        /debug routes are left out: the recorder answered them 404 itself, as replayed now."""
        if path.startswith("/debug"):
            return
        what = f"{method.upper()} {path}"
        self.misses += 1
        if what not in self.missed:
            body = content.decode("utf-8", "replace")
            self.first_missed[what] = body if len(body) <= 120 else body[:119] + "…"
            log.warning(
                "baseline: %s was never recorded (first: %s); answered 404, which is not the reference's answer",
                what, self.first_missed[what],
            )  # fmt: skip
        self.missed[what] = self.missed.get(what, 0) + 1

    def notes(self, name: str) -> list[str]:
        """One warning naming every kind of request the recording could not answer (none: [])."""
        if not self.missed:
            return []
        asked = "; ".join(
            f"{what} x{n} (first: {self.first_missed[what]})" for what, n in self.missed.items()
        )
        return [
            f"{name}: the baseline holds no answer to {self.misses} request(s) this run asked ({asked}): "
            "each was answered 404, which is not what the recorded reference answered, so the numbers "
            "resting on them are not the reference's; re-record the baseline with this difftest"
        ]


REQUEST_FIELDS = ("id", "prompt", "max_tokens", "messages")  # what a prompt's requests depend on


def prompt_record(p: Prompt) -> dict[str, Any]:
    """`p` as the file keeps it; its tags too, so a run against the baseline keeps the per-tag
    breakdown of the live reference's (they change no request, so `check` does not compare them)."""
    rec: dict[str, Any] = {"id": p.id, "prompt": p.prompt, "max_tokens": p.max_tokens}
    messages = getattr(p, "messages", None)
    if messages:
        rec["messages"] = [dict(m) for m in messages]
    if p.tags:
        rec["tags"] = list(p.tags)
    return rec


def _request_fields(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k in REQUEST_FIELDS}


@dataclass
class Baseline:
    """A recorded reference, as read from (or about to be written to) its file."""

    reference: dict[str, Any]
    settings: dict[str, Any]
    prompts: list[dict[str, Any]]
    exchanges: Exchanges
    tokenizer: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    path: Path | None = None
    # the replays handed out (`transport`): what they could not answer goes into the report
    replays: list[ReplayTransport] = field(default_factory=list, repr=False, compare=False)

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created_at": self.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "reference": self.reference,
            "settings": self.settings,
            "prompts": self.prompts,
            "tokenizer": self.tokenizer,
            "capabilities": self.capabilities,
            "signature": self.signature,
            "exchanges": self.exchanges.to_list(),
        }

    def write(self, path: Path, *, overwrite: bool = False) -> Path:
        """Atomically: a half-written baseline never replaces a good one. The temporary file is
        this process's own (two writers never interleave in one), and without `overwrite` a
        baseline that appeared at `path` meanwhile is kept (OutputError): it may be the only copy."""
        path = Path(path)
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _own_temp(path)
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, ensure_ascii=False, separators=(",", ":"))
            if overwrite:
                tmp.replace(path)
            else:
                _place_new(tmp, path)
        except OSError as exc:  # a full disk, a folder in the file's place: one line, exit 2
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)  # a stray half-written file is no baseline
            if not overwrite and exc.errno == errno.EEXIST and path.is_file():
                raise OutputError(
                    path, "a baseline appeared there while recording (another difftest record?); kept it"
                ) from None
            raise output_error(path, exc) from None
        return path

    @classmethod
    def read(cls, path: Path | str) -> Baseline:
        """The file, checked: a missing, corrupt or foreign file is a one-line UsageError."""
        path = Path(path)
        if path.is_dir():
            path = path / f"baseline{SUFFIX}"
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"baseline {path} does not exist (make it with `difftest record`)") from None
        except (OSError, EOFError, ValueError) as exc:
            raise UsageError(f"baseline {path}: not a gzip-compressed JSON baseline ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"baseline {path}: not a difftest baseline (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise UsageError(
                f"baseline {path}: version {data.get('version')!r}, this difftest reads version {VERSION}"
            )
        try:
            _check_shapes(data)
            return cls(
                reference=dict(data["reference"]),
                settings=dict(data["settings"]),
                prompts=list(data["prompts"]),
                exchanges=Exchanges.from_list(data["exchanges"]),
                tokenizer=dict(data.get("tokenizer") or {}),
                capabilities=dict(data.get("capabilities") or {}),
                signature=dict(data.get("signature") or {}),
                created_at=str(data.get("created_at", "")),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"baseline {path}: malformed ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ use

    def prompt_list(self) -> list[Prompt]:
        from difftest.prompts import Prompt

        out = []
        for rec in self.prompts:
            extra = {"messages": tuple(rec["messages"])} if rec.get("messages") else {}
            out.append(
                Prompt(
                    id=rec["id"],
                    prompt=rec["prompt"],
                    max_tokens=rec.get("max_tokens"),
                    tags=tuple(rec.get("tags") or ()),  # a file recorded before tags were kept has none
                    source="baseline",
                    **extra,
                )
            )
        return out

    def replay_model(self) -> str | None:
        """The model id to ask the replay for: the recorded one. Asked for none, the probe takes the
        first id /v1/models lists, and a recording of a url reference that named another of
        several served models holds no answer to that (every request a 404). Where the recording
        itself took the first of several (its probe said so), None asks as it did."""
        model = self.reference.get("model")
        return None if self.took_first_model() else model if isinstance(model, str) else None

    def took_first_model(self) -> bool:
        """Whether the recording's probe took the first of several served models (none configured):
        the probe's field `model_first_of_several` where the file holds it."""
        caps = self.capabilities
        if "model_first_of_several" in caps:
            return caps["model_first_of_several"] is True
        # A file recorded before the probe kept that field says it only in a warning's words: read
        # them as this difftest words it (a reworded warning misses such old files, never new ones)
        from difftest.conformance import WARNINGS

        head = WARNINGS["several_models"].split("{", 1)[0]
        return any(str(w).startswith(head) for w in caps.get("warnings") or ())

    @property
    def slot_draws(self) -> int:
        """How many independent draws of the batch-slot check the recording holds: 0 when recorded
        without it, 1 for a file that does not say (recorded before draws were counted). The replay
        answers a draw past these with the last one again, which is no new draw: a run judging a
        target's slot variance against "the worst of N draws" of this baseline has only this many."""
        if self.signature.get("batch_slot_check") is False:
            return 0
        draws = self.signature.get("batch_slot_draws", 1)
        return draws if _is_int(draws) and draws >= 0 else 1

    def check(self, settings: dict[str, Any], prompts: Sequence[Prompt]) -> None:
        """Refuse (UsageError, exit 2) a run that would ask what the baseline never recorded."""
        where = f"baseline {self.path}" if self.path else "baseline"
        for key in SETTINGS_KEYS:
            mine, theirs = settings.get(key), self.settings.get(key)
            if mine != theirs:
                raise UsageError(f"{where} was recorded with {key}={theirs!r}, this run uses {key}={mine!r}")
        # every batched request of the check would be a 404 "not recorded", which the invariance
        # check then read as the reference's own slot variance of 0 (chat runs skip the check)
        if settings.get("batch_slot_check") and settings.get("endpoint") != "chat" and not self.slot_draws:
            raise UsageError(
                f"{where} was recorded without the batch-slot check, this run has batch_slot_check = true: "
                "re-record it with the check (no --no-batch-slot-check) or set batch_slot_check = false"
            )
        recorded = {rec["id"]: rec for rec in self.prompts}
        for p in prompts:
            rec = recorded.get(p.id)
            if rec is None:
                raise UsageError(f"{where} has no prompt {p.id!r} ({len(recorded)} prompts recorded)")
            if _request_fields(prompt_record(p)) != _request_fields(rec):
                raise UsageError(f"{where}: prompt {p.id!r} differs from the recorded one")
        self._check_answered(where, settings, prompts)
        self._check_slot_probe(where, settings, prompts)

    def _check_answered(self, where: str, settings: Mapping[str, Any], prompts: Sequence[Prompt]) -> None:
        """Each prompt's greedy request is in the exchanges: a prompt text edited in the file asks
        what was never recorded, every request a 404 read as the reference failing (exit 3, which
        a CI job retries in vain). A prompt whose recording failed with no answer at all is not
        there either: those the file names (`failed_prompts`) are let through, and all of them in
        a file that counts its failures without naming them (recorded before they were named)."""
        failed = self.reference.get("failed_prompts")
        if failed is None and self.reference.get("failed_generations"):
            return
        asked, lost = self._greedy_requests(), set(failed or ())
        for p in prompts:
            if p.id in lost:
                continue
            limit = p.max_tokens or settings.get("max_tokens")
            if _greedy_key(p, settings.get("endpoint"), limit) not in asked:
                raise UsageError(
                    f"{where}: prompt {p.id!r} has no recorded answer (its text, messages or max_tokens "
                    "are not what was asked: an edited file?); re-record it"
                )

    def _greedy_requests(self) -> set[str]:
        """(text or messages, max_tokens) of every recorded generation request (echoes left out)."""
        out = set()
        for key in self.exchanges.table:
            _, path, body = json.loads(key)
            if isinstance(body, dict) and path.endswith("/completions") and not body.get("echo"):
                what = body.get("messages") if path.endswith("/chat/completions") else body.get("prompt")
                out.add(json.dumps([what, body.get("max_tokens")], sort_keys=True))
        return out

    def _check_slot_probe(self, where: str, settings: Mapping[str, Any], prompts: Sequence[Prompt]) -> None:
        """The batch-slot check probes the run's first prompt, and the recording holds the slot
        draws of its own first prompt only: with another first prompt every reference draw is a
        404, read as "not measured on the reference", and the target is judged alone."""
        if not (settings.get("batch_slot_check") and settings.get("endpoint") != "chat" and self.slot_draws):
            return
        if prompts and self.prompts and prompts[0].id != self.prompts[0]["id"]:
            raise UsageError(
                f"{where}: the batch-slot check probes the first prompt, and this run's ({prompts[0].id!r}) "
                f"is not the recording's ({self.prompts[0]['id']!r}): put {self.prompts[0]['id']!r} "
                "first in the prompts (or, in a config, set batch_slot_check = false)"
            )

    def transport(self) -> ReplayTransport:
        replay = ReplayTransport(self.exchanges)
        self.replays.append(replay)
        return replay

    def replay_notes(self, name: str) -> list[str]:
        """What the run asked that the recording could not answer, as run warnings (none: [])."""
        return [n for r in self.replays for n in r.notes(name)]

    def provenance(self) -> dict[str, Any]:
        """What report.json's signature records of the baseline a run was judged against."""
        return {
            "file": str(self.path) if self.path else None,
            "created_at": self.created_at,
            "reference": self.reference,
            "settings": self.settings,
            "prompts": len(self.prompts),
            "recorded_with": self.signature.get("versions", {}).get("difftest"),
            "not_recorded": _merged(r.missed for r in self.replays),  # requests answered 404: none is {}
        }

    def describe(self) -> str:
        model = self.reference.get("model") or "unknown model"
        return (
            f"baseline of {self.reference.get('name')} ({model}, {self.reference.get('url')}), "
            f"{len(self.prompts)} prompts, recorded {self.created_at}"
        )


def _own_temp(path: Path) -> Path:
    """A new empty file beside `path`, named for this process alone (O_EXCL): a second writer
    gets its own, never a share of this one. Created with the usual 0o666 less umask, as the
    baseline itself would be (tempfile.mkstemp's 0o600 would stay on the baseline after the move)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _place_new(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` only if nothing is there (FileExistsError otherwise): a hard link
    fails where the name exists, so the check and the move are one step. Where the file system
    has no hard links, the check comes just before the rename (a window of microseconds)."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        tmp.replace(path)
        return
    with contextlib.suppress(OSError):  # the baseline is in place: a stray temp file is no failure
        tmp.unlink()


# what link(2) answers on a file system without hard links (vfat, some network and FUSE mounts)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _merged(counts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for what, n in c.items():
            out[what] = out.get(what, 0) + n
    return out


def _greedy_key(p: Prompt, endpoint: str | None, max_tokens: Any) -> str:
    """`p`'s greedy request as `Baseline._greedy_requests` lists the recorded ones."""
    if endpoint == "chat":
        from difftest.chat import messages_of

        return json.dumps([messages_of(p), max_tokens], sort_keys=True)
    return json.dumps([p.prompt, max_tokens], sort_keys=True)


def _check_shapes(data: Mapping[str, Any]) -> None:
    """The fields a run reads, of the types it reads them as (ValueError naming the first that is
    not): a damaged file is refused at once, not as a KeyError or TypeError halfway through a run.
    The exchanges are checked as they are read (Exchanges.from_list)."""
    settings = data["settings"]
    if not isinstance(settings, dict):
        raise ValueError("'settings' is not an object")
    # logprobs 1..20 as --logprobs and [run] logprobs: no recording holds 0 (config.LOGPROBS_WHY)
    for key, ok in (("max_tokens", lambda v: _is_int(v) and v >= 1), ("logprobs", lambda v: _is_int(v) and 1 <= v <= 20),
                    ("seed", lambda v: v is None or (_is_int(v) and v >= 0)),
                    ("endpoint", lambda v: v in (None, "completions", "chat"))):  # fmt: skip
        if key in settings and not ok(settings[key]):
            raise ValueError(f"settings.{key} is {settings[key]!r}")
    failed = data["reference"].get("failed_prompts") if isinstance(data["reference"], dict) else None
    if failed is not None and not (isinstance(failed, list) and all(isinstance(f, str) for f in failed)):
        raise ValueError("reference.failed_prompts is not a list of prompt ids")
    prompts = data["prompts"]
    if not isinstance(prompts, list):
        raise ValueError("'prompts' is not a list")
    seen: dict[str, int] = {}
    for i, rec in enumerate(prompts):
        if not (
            isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("prompt"), str)
        ):
            raise ValueError(f"prompts[{i}] has no string 'id' and 'prompt'")
        if rec.get("max_tokens") is not None and not (_is_int(rec["max_tokens"]) and rec["max_tokens"] >= 1):
            raise ValueError(f"prompts[{i}].max_tokens is {rec['max_tokens']!r}")
        if rec.get("messages") is not None and not isinstance(rec["messages"], list):
            raise ValueError(f"prompts[{i}].messages is not a list")
        tags = rec.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise ValueError(f"prompts[{i}].tags is not a list of strings")
        # a prompt judged twice counts twice in every mean; a prompts file refuses the same, and
        # as it does, two ids that differ only in Unicode normalisation (they print alike)
        key = unicodedata.normalize("NFC", rec["id"])
        if key in seen:
            j, other = seen[key], prompts[seen[key]]["id"]
            if other == rec["id"]:
                raise ValueError(f"prompts[{i}]: duplicate id {other!r} (first at prompts[{j}])")
            raise ValueError(
                f"prompts[{i}]: id {ascii(rec['id'])} differs from prompts[{j}]'s {ascii(other)} "
                "only in Unicode normalisation (NFC/NFD)"
            )
        seen[key] = i


def run_settings(run: Any) -> dict[str, Any]:
    """The settings a baseline must share with a run (from RunSettings); batch_slot_check is
    checked against what the recording holds (Baseline.slot_draws), not against `settings`."""
    return {
        "max_tokens": run.max_tokens,
        "logprobs": run.logprobs,
        "seed": run.seed,
        "endpoint": getattr(run, "endpoint", "completions"),
        "batch_slot_check": getattr(run, "batch_slot_check", False),
    }
