"""Relays one streamed answer to the client and, when its backend fails mid-answer, continues it elsewhere.

The relay works on the seam's canonical events: the backend's adapter decodes its framing into events,
:class:`~skyfabric.protocols.progress.Progress` records what the client has (thinking, text, tool calls,
each exactly), and the client's frontend encodes events in the client's protocol. While the first backend
speaks the client's protocol and nothing needs rewriting, its bytes pass through untouched and the events
are only read beside the copy (the fast path).

Past the commit point (the first token sent) a failure — reset, stall beyond the idle timeout, malformed
event, in-band error, or an end without a finish reason — does not reach the client. The relay moves the
stream to another backend, in one of two ways:

* **prefill** — the backend's adapter builds a request whose answer goes on from the progress (a final
  assistant turn: vLLM's ``continue_final_message``, Anthropic's prefill; skyfabric's own replicas also
  continue a thinking block or a tool call's arguments). A continuation's first characters are held back
  until they show they do not repeat the prefix (:func:`restart_verdict`), so a backend that ignores the
  prefill never makes the client receive the same text twice.
* **replay** — for what the backend cannot continue natively (a tool call cut mid-arguments on an engine
  that only continues text, a thinking block, text after thinking on Anthropic, which refuses a prefill
  with thinking on), the backend is asked for the whole answer again and :class:`Replay` checks, part by
  part and character by character, that it repeats exactly what the client has before it forwards what
  follows. It is exact by construction: the client ends up with one backend's single, whole answer, whose
  beginning it already had — so a tool call's arguments are never repeated, lost, or doubled by a second
  conflicting call. It needs a deterministic answer (temperature 0 or a seed); a backend whose replay
  differs is refused for this stream and the next one is tried.

When no backend is left, or the stream holds what cannot be reproduced (several choices, log-probabilities,
a token count the backends did not report), the client gets an in-band error event, never a truncated
stream that looks finished.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from skyfabric.core.errors import (
    ContinuationRefused,
    MalformedEvent,
    RemoteProtocolError,
    UpstreamError,
    UpstreamStatus,
)
from skyfabric.gateway.balancer import EndpointState, record_success
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.observe import CONTINUATION, upstream_headers
from skyfabric.gateway.router import Router
from skyfabric.http.client import UpstreamResponse
from skyfabric.protocols.base import Backend, Decoder, Encoder, UpstreamCall
from skyfabric.protocols.canonical import (
    End,
    Event,
    Finish,
    PartEnd,
    PartStart,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from skyfabric.protocols.progress import Part, Progress

log = logging.getLogger("skyfabric.gateway.relay")

#: Characters of the prefix's start that a continuation must not repeat (fewer when the prefix is shorter).
HEAD = 24
#: Shortest overlap with the prefix's end that counts as a re-sent tail.
TAIL = 16


def normalized(text: str) -> str:
    """Text with runs of whitespace made one space and the ends trimmed: engines trim and re-space."""
    return " ".join(text.split())


def repeats_itself(text: str) -> bool:
    """Whether ``text``'s words repeat with a period of at most half their number ("ha ha ha ha"), or
    it is a single word.

    Going on from such a text may look exactly like starting it again, so no check can tell a restart
    from a continuation there: the relay lets it through.
    """
    words = text.split()
    n = len(words)
    if n < 2:
        return True
    border = [0] * n  # Knuth-Morris-Pratt: longest proper prefix of words[:i+1] that is also its suffix
    k = 0
    for i in range(1, n):
        while k and words[i] != words[k]:
            k = border[k - 1]
        if words[i] == words[k]:
            k += 1
        border[i] = k
    return n - border[-1] <= n // 2


def restart_verdict(prefix: str, seen: str, *, final: bool) -> bool | None:
    """Whether a continuation that began with ``seen`` repeats ``prefix`` (both :func:`normalized`).

    True: it restarted the answer (repeats the prefix's first ``HEAD`` characters) or re-sent the prefix's
    last ``TAIL``+ characters. False: it goes on from the prefix. None: too early to tell (``seen`` could
    still become either); ``final`` (the continuation ended) decides for what was seen.
    """
    if not seen or not prefix:
        return None if not final and prefix else False
    head = prefix[:HEAD]
    if seen.startswith(head):
        return True
    for overlap in range(min(len(seen), len(prefix)), min(TAIL, len(prefix)) - 1, -1):
        if prefix.endswith(seen[:overlap]):
            return True
    if head.startswith(seen):
        return True if final else None
    if not final and len(seen) < TAIL and seen in prefix:
        return None
    return False


_CONTENT = (TextDelta, ReasoningDelta, ToolCallDelta, ReasoningSignature, RedactedReasoning)


class Replay:
    """Checks a regenerated answer against what the client has, and passes on only what is new.

    ``sent`` is the client's answer at the break, as parts. Each event of the new answer is recorded in a
    :class:`Progress` of its own and compared with ``sent``: part ``q`` must be of the same kind (and, for
    a tool call, the same function) and its characters must equal the sent ones where both exist; a part
    the client already had whole must not grow; the new answer may not move past a sent part before it has
    repeated it whole, nor finish before it has repeated everything. Any difference raises
    :class:`ContinuationRefused`. Characters past what the client has are returned as events — the rest of
    the cut part, then the new parts, with their tool-call indices — and nothing else.
    """

    def __init__(self, sent: list[Part], endpoint: str) -> None:
        self.sent = [replace(p) for p in sent]
        self.new = Progress()
        self.endpoint = endpoint
        #: Characters of each part the client has, beyond the sent ones (the cut part, new parts).
        self.given: dict[int, int] = {}
        self.opened: set[int] = set()
        #: New tool-call parts → the index the client gets for them (after the ones it has).
        self.tool_index: dict[int, int] = {}

    def _refuse(self, why: str) -> ContinuationRefused:
        return ContinuationRefused(f"its replay differs from what was sent: {why}", endpoint=self.endpoint)

    def _covered(self, q: int) -> None:
        """The new answer moved past part ``q``: it must have repeated that part whole."""
        if q < len(self.sent):
            sent, new = self.sent[q], self.new.parts[q]
            if len(new.text) < len(sent.text):
                raise self._refuse(f"part {q} ({sent.kind}) ended early")

    def _whole(self, q: int) -> bool:
        """Whether the client had sent part ``q`` whole (nothing may be added to it)."""
        sent = self.sent[q]
        return q < len(self.sent) - 1 or sent.closed or sent.signature is not None or sent.kind == "redacted"

    def _client_index(self, q: int, index: int) -> int:
        """The tool-call index the client knows part ``q`` by (the replay numbers its own calls)."""
        if q < len(self.sent):
            return self.sent[q].index
        known = self.tool_index.get(q)
        if known is None:
            tools = [p.index for p in self.sent if p.kind == "tool"] + list(self.tool_index.values())
            known = self.tool_index[q] = max(tools) + 1 if tools else index
        return known

    def feed(self, event: Event) -> list[Event]:
        """The events to forward for ``event`` of the replayed answer (raises when it differs)."""
        if isinstance(event, Finish):
            if event.choice == 0:
                if len(self.new.parts) < len(self.sent):
                    raise self._refuse("it finished before repeating what was sent")
                self._covered(len(self.sent) - 1)
            return [event]
        if isinstance(event, PartEnd):
            self.new.observe(event)
            q = len(self.new.parts) - 1
            if q < 0:
                return []
            if q < len(self.sent):
                self._covered(q)
                if self._whole(q):
                    return []  # the client saw this block end already
            return [event]
        if not isinstance(event, (*_CONTENT, PartStart)):
            return [event] if isinstance(event, Usage) else []
        count = len(self.new.parts)
        self.new.observe(event)
        if not self.new.parts:
            return []
        q = len(self.new.parts) - 1
        if q > 0 and len(self.new.parts) > count:
            self._covered(q - 1)
        part = self.new.parts[q]
        if q < len(self.sent):
            sent = self.sent[q]
            if part.kind != sent.kind:
                raise self._refuse(f"part {q} is {part.kind}, not {sent.kind}")
            if part.kind == "tool" and part.name and sent.name and part.name != sent.name:
                raise self._refuse(f"it calls {part.name}, not {sent.name}")
            n = min(len(part.text), len(sent.text))
            if part.text[:n] != sent.text[:n]:
                raise self._refuse(f"part {q} ({part.kind}) differs at character {n}")
            if self._whole(q) and len(part.text) > len(sent.text):
                raise self._refuse(f"part {q} ({part.kind}) is longer than the one sent whole")
            have = len(sent.text)
        else:
            have = 0
        if isinstance(event, PartStart):
            return [] if q < len(self.sent) else [event]
        have += self.given.get(q, 0)
        if isinstance(event, ReasoningSignature):
            if q < len(self.sent):
                if self.sent[q].signature is not None:
                    return []
                self._covered(q)  # a signature closes the block: it must hold what was sent, whole
            return [event]
        if isinstance(event, RedactedReasoning):
            return [] if q < len(self.sent) else [event]
        extra = part.text[have:]
        if not extra and not (part.kind == "tool" and q >= len(self.sent) and q not in self.opened):
            return []
        self.given[q] = self.given.get(q, 0) + len(extra)
        if isinstance(event, TextDelta):
            return [TextDelta(extra)]
        if isinstance(event, ReasoningDelta):
            return [ReasoningDelta(extra)]
        assert isinstance(event, ToolCallDelta)
        index = self._client_index(q, part.index)
        if q >= len(self.sent) and q not in self.opened:
            self.opened.add(q)
            return [ToolCallDelta(index, extra, id=part.id, name=part.name)]
        return [ToolCallDelta(index, extra)]


class StreamRelay:
    """One client stream, possibly served by several backends in turn."""

    def __init__(
        self,
        router: Router,
        ctx: RequestContext,
        state: EndpointState,
        resp: UpstreamResponse,
        *,
        passthrough: bool,
        usage_added: bool,
    ):
        self.router = router
        self.ctx = ctx
        self.state = state
        self.resp = resp
        self.backend: Backend = router.backend(state.endpoint)
        self.decoder: Decoder = self.backend.decoder()
        self.encoder: Encoder = ctx.frontend.encoder(ctx.request)
        self.progress = Progress()
        #: The first backend's bytes go to the client as they came (same protocol, nothing to rewrite).
        self.passthrough = passthrough
        #: The relay asked that backend for usage the client did not ask for: such events are re-encoded.
        self.usage_added = usage_added
        self.out: list[bytes] = []
        self.done = False
        self.segment = 0
        #: How the current part continues: ``first`` (the original answer), ``prefill`` or ``replay``.
        self.mode = "first"
        #: Output tokens the client had before the current backend's part, exactly (None: not counted).
        self.base_tokens: int | None = 0
        self.held = False
        self.continuations = 0
        #: While a prefilled continuation's first text is checked against the prefix: its events.
        self._checking: list[Event] | None = None
        self._checked_text = ""
        self._prefix_norm = ""
        #: Whitespace the client already has that the continuation's prefix left out (engines trim it).
        self._ws_debt = ""
        #: Prefill: how a continuation's tool-call indices map to the client's (None: not seen yet).
        self._tool_shift: int | None = None
        self._replay: Replay | None = None
        #: The encoder knows what passed through (see ``_resume_if_passed``).
        self._resumed = False
        #: Prefill: whether the continuation's opening block (the client's open one) was seen.
        self._opened_continued = False
        #: Each backend's own usage (for the ledger: what every part cost), and the endpoints in order.
        self.parts_usage: list[Usage] = []
        self.backends = [state.endpoint.id]

    # -- reading ----------------------------------------------------------------------------------------

    def _absorb(self, piece: bytes) -> bool:
        """Take upstream bytes; queue what the client should get. True when a token event was seen."""
        token = False
        error: MalformedEvent | None = None
        try:
            items = self.decoder.feed(piece)
        except MalformedEvent as exc:  # what came whole before the bad event still goes to the client
            items, error = getattr(exc, "decoded", []), exc
        for raw, events in items:
            if self.segment == 0 and self.passthrough:
                token |= self._pass(raw, events)
                continue
            for event in events:
                token |= self._take(event)
        if error is not None:
            raise error
        return token

    def _pass(self, raw: bytes, events: list[Event]) -> bool:
        """The fast path: the client gets ``raw`` as it came; the events only record progress."""
        # Re-encoded instead when it carries usage the relay asked for and the client did not. The
        # encoder then learns what the client has *before* this event (a tool call this event opens
        # must still be sent with its id and name).
        rewrite = self.usage_added and any(isinstance(event, Usage) for event in events)
        if rewrite and not any(isinstance(event, Start) for event in events):
            self.encoder.resume(self.progress)
        token = False
        for event in events:
            if isinstance(event, StreamError):
                raise RemoteProtocolError(f"upstream sent an in-band error: {event.message}")
            if isinstance(event, End):
                self._ended()
                if self.usage_added:
                    self.out.append(self._encoder_end())
                    return token
                continue
            if isinstance(event, Usage):
                self.parts_usage_update(event)
            token |= self.progress.observe(event)
        if not rewrite:
            self.out.append(raw)
        else:
            for event in events:
                if isinstance(event, Usage):
                    self.encoder.encode(self._client_usage(event))
                else:
                    self.out.append(self.encoder.encode(event))
        return token

    def _take(self, event: Event) -> bool:
        """One event of a translated stream or of a continuation: check it, record it, encode it."""
        if isinstance(event, StreamError):
            raise RemoteProtocolError(f"upstream sent an in-band error: {event.message}")
        if isinstance(event, End):
            if self._checking is not None:
                self._settle(final=True)
            self._ended()
            self.out.append(self._encoder_end())
            return False
        if isinstance(event, Start):
            if self.segment == 0:
                self.progress.observe(event)
                self.out.append(self.encoder.encode(event))
            return False
        if isinstance(event, Usage):
            self.parts_usage_update(event)
            if self._checking is not None:
                self._checking.append(event)  # counted as sent only once the held text is accepted
                return False
            return self._emit(event)
        if self._replay is not None:
            token = False
            for forward in self._replay.feed(event):
                token |= self._emit(forward)
            return token or isinstance(event, Finish)
        if self.mode == "prefill":
            if isinstance(event, PartStart) and not self._opened_continued:
                self._opened_continued = True
                last = self.progress.open_part
                if last is not None and last.kind == event.kind and not last.closed:
                    return False  # the continuation's block is the client's open one, going on
            event = self._shift(event)
            if self._checking is not None:
                self._check(event)
                return True
            if self._ws_debt:
                event = self._pay_ws_debt(event)
        return self._emit(event)

    def _emit(self, event: Event) -> bool:
        if isinstance(event, Usage):
            self.progress.observe(event)
            self.encoder.encode(self._client_usage(event))
            return False
        token = self.progress.observe(event)
        self.out.append(self.encoder.encode(event))
        return token

    def parts_usage_update(self, usage: Usage) -> None:
        """Keep the current backend's latest usage (cumulative within its part); one entry per part, an
        empty :class:`Usage` for a part that reported none."""
        while len(self.parts_usage) < self.segment:
            self.parts_usage.append(Usage())
        if len(self.parts_usage) == self.segment:
            self.parts_usage.append(usage)
        else:
            self.parts_usage[self.segment] = usage

    def _client_usage(self, usage: Usage) -> Usage:
        """The whole answer's usage, as one uninterrupted answer would report it.

        A prefilled part's prompt holds the text already sent (its tokens are not the client's input) and
        its output is only the rest; a replayed part generated the whole answer itself.
        """
        if self.segment == 0 or self.mode == "replay":
            return usage
        base = self.base_tokens or 0
        prompt = None if usage.input_tokens is None else max(0, usage.input_tokens - base)
        output = None if usage.output_tokens is None else usage.output_tokens + base
        return Usage(prompt, output, usage.cached_input_tokens, usage.cache_creation_input_tokens)

    def _ended(self) -> None:
        if self.progress.finish is None:
            raise MalformedEvent("upstream ended its stream before any finish reason")
        self.done = True

    def _encoder_end(self) -> bytes:
        self._resume_if_passed()
        return self.encoder.end()

    def _resume_if_passed(self) -> None:
        """Before the relay's own output on a stream whose bytes so far passed through: tell the encoder
        what the client has (its id, open block, whether the finish was sent), once."""
        if self.segment == 0 and self.passthrough and not self._resumed:
            self._resumed = True
            self.encoder.resume(self.progress)

    # -- prefilled continuations -------------------------------------------------------------------------

    def _shift(self, event: Event) -> Event:
        """A prefilled continuation's tool call, renumbered as the client knows it.

        The first tool-call delta of a continuation that was cut inside a tool call goes on with that call
        (its id and name, which the client already has, are dropped); later calls follow the client's last.
        """
        if not isinstance(event, ToolCallDelta):
            return event
        if self._tool_shift is None:
            tools = [p for p in self.progress.parts if p.kind == "tool"]
            open_part = self.progress.open_part
            if open_part is not None and open_part.kind == "tool":
                self._tool_shift = open_part.index - event.index
                return ToolCallDelta(open_part.index, event.arguments, choice=event.choice)
            self._tool_shift = (tools[-1].index + 1 if tools else 0) - event.index
        index = event.index + self._tool_shift
        last = self.progress.open_part
        if last is not None and last.kind == "tool" and last.index == index:
            return ToolCallDelta(index, event.arguments, choice=event.choice)
        return ToolCallDelta(index, event.arguments, id=event.id, name=event.name, choice=event.choice)

    def _check(self, event: Event) -> None:
        """Hold a continuation's event until its text shows it continues the prefix (or restarted)."""
        assert self._checking is not None
        if isinstance(event, ReasoningDelta) and not self._checked_text:
            # asked to go on with its text, it began thinking again: it answered from the start
            raise ContinuationRefused(
                "it began thinking again instead of continuing the text",
                endpoint=self.state.endpoint.id,
                sent_any=True,
            )
        self._checking.append(event)
        if isinstance(event, PartStart | PartEnd):
            return
        final = isinstance(event, Finish) and event.choice == 0
        if isinstance(event, TextDelta) and event.choice == 0:
            self._checked_text += event.text
        elif not final and not isinstance(event, TextDelta):
            final = True  # something other than text follows: the text part is over
        if final or self._checked_text:
            self._settle(final=final)

    def _settle(self, *, final: bool) -> None:
        """Decide on the held continuation: raise if it restarted, else send what was held."""
        assert self._checking is not None
        verdict = restart_verdict(self._prefix_norm, normalized(self._checked_text), final=final)
        if verdict is None:
            return
        if verdict:
            raise ContinuationRefused(
                f"it restarted the answer instead of continuing it: {self._checked_text[:60]!r}",
                endpoint=self.state.endpoint.id,
                sent_any=True,
            )
        held, self._checking = self._checking, None
        for event in held:
            if self._ws_debt:
                event = self._pay_ws_debt(event)
            self._emit(event)

    def _pay_ws_debt(self, event: Event) -> Event:
        """Drop from the continuation's start the whitespace the client already has."""
        if not isinstance(event, TextDelta) or not event.text:
            if not isinstance(event, Usage):
                self._ws_debt = ""
            return event
        debt, text, i = self._ws_debt, event.text, 0
        while i < len(debt) and i < len(text) and debt[i] == text[i]:
            i += 1
        self._ws_debt = debt[i:] if i == len(text) else ""
        return TextDelta(text[i:], event.choice)

    # -- the first part ---------------------------------------------------------------------------------

    async def prime(self) -> None:
        """Read up to the first token: the commit point. Failures before it raise for a plain retry."""
        timeouts = self.router.timeouts
        try:
            while True:
                remaining = max(0.001, self.ctx.deadline - self.router.clock())
                piece = await self.resp.next(min(timeouts.first_token, remaining), "first_token")
                if piece is None:
                    raise RemoteProtocolError(
                        "stream ended before its first token", endpoint=self.state.endpoint.id
                    )
                if self._absorb(piece) or self.done:
                    self._hold(self.state)
                    return
        except MalformedEvent as exc:
            self.resp.release()
            raise RemoteProtocolError(str(exc), endpoint=self.state.endpoint.id) from None
        except BaseException:
            self.resp.release()
            raise

    # -- accounting of the endpoint that is serving the stream -------------------------------------------

    def _hold(self, state: EndpointState) -> None:
        """``state`` now serves this stream: it counts as streaming and has just shown life."""
        self.state = state
        self.held = True
        state.streaming += 1
        state.last_activity = self.router.clock()

    def _let_go(self) -> None:
        """The serving endpoint is done with this stream (finished, failed or abandoned)."""
        if self.held:
            self.held = False
            self.state.outstanding -= 1
            self.state.streaming -= 1

    def abandon(self) -> None:
        """The stream will never be sent (a hedge that committed too late): close it, free its slot."""
        self.resp.abort()
        self._let_go()

    # -- the stream -------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[bytes]:
        """The bytes of the client's stream, continuing on other backends when needed."""
        timeouts = self.router.timeouts
        completed = False
        try:
            while True:
                if self.out:
                    chunk = b"".join(self.out)
                    self.out.clear()
                    if chunk:
                        yield chunk
                if self.done:
                    completed = True
                    await self._drain()
                    return
                try:
                    remaining = self.ctx.deadline - self.router.clock()
                    if remaining <= 0:
                        yield self.encoder.error(
                            "the request's deadline passed mid-stream", "timeout_error", "deadline_exceeded"
                        )
                        return
                    piece = await self.resp.next(min(timeouts.idle, remaining), "idle", sent_any=True)
                    self.state.last_activity = self.router.clock()
                    if piece is None:
                        if self._checking is not None:
                            self._settle(final=True)
                        if self.progress.finish is not None:
                            # Complete but for its end event: finish it rather than fail a finished answer.
                            self.done = True
                            self.out.append(self._encoder_end())
                            continue
                        raise RemoteProtocolError("stream ended without a finish reason", sent_any=True)
                    self._absorb(piece)
                except (UpstreamError, MalformedEvent) as exc:
                    why = await self._continue(exc)
                    if why is not None:
                        self.router.metrics.stream_errors.inc()
                        if self.out:
                            yield b"".join(self.out)
                            self.out.clear()
                        yield self.encoder.error(
                            f"the backend failed mid-stream and {why}: {exc}",
                            "api_error",
                            "stream_interrupted",
                        )
                        return
        except Exception as exc:  # a defect or hostile input no rule foresaw: say so in band, never hang
            log.exception("stream relay failed: %s", exc)
            self.router.metrics.stream_errors.inc()
            yield self.encoder.error(f"the gateway failed mid-stream: {type(exc).__name__}", "api_error")
        finally:
            try:
                if completed and self.held:
                    record_success(self.state, self.router.clock())
                    self.resp.release()
                else:
                    self.resp.abort()
                self._let_go()
                # Tokens by the backends' usage; where none reported it, the chunks (at least one each).
                sent = self._tokens_sent()
                self.ctx.usage_parts = self.parts_usage
                self.ctx.parts_endpoints = self.backends
                self.router.observer_of(self.ctx).stream_end(
                    self.ctx, self.state, sent if sent is not None else self.progress.chunks, completed
                )
            finally:
                self.ctx.finish()  # the admission slot is freed whatever happened above

    async def _drain(self) -> None:
        """Read the rest of the HTTP message after the end event so the connection can be reused."""
        if self.resp.released:
            return
        with contextlib.suppress(UpstreamError):
            while await self.resp.next(0.5) is not None:
                pass

    # -- continuation -----------------------------------------------------------------------------------

    def _tokens_sent(self) -> int | None:
        """Output tokens the client has been sent, exactly (the backends' usage), or None."""
        part = self.progress.segment_tokens
        if self.mode == "replay":
            # The replay generated the whole answer itself; until it passes what was sent, the client
            # has what it had at the break.
            if part is None or self._replayed_tokens is None:
                return part
            return max(part, self._replayed_tokens)
        return None if self.base_tokens is None or part is None else self.base_tokens + part

    def _blocker(self, tokens: int | None) -> str | None:
        """Why the stream cannot be continued exactly, or None."""
        why = self.ctx.uncontinuable() or self.progress.blocker
        if why is not None:
            return f"a stream with {why} cannot be continued"
        return None

    def _call(self, state: EndpointState, tokens: int | None) -> tuple[UpstreamCall, str, str]:
        """The request that continues the stream on ``state``: (call, mode, text given as prefix)."""
        backend = self.router.backend(state.endpoint)
        if backend.family != self.ctx.frontend.family:
            self.ctx.request.lower()
        progress = self.progress
        if not progress.parts:
            return backend.build(self.ctx.request, state.endpoint, usage=self.ctx.usage_needed()), "first", ""
        open_part = progress.open_part
        assert open_part is not None
        caps = backend.capabilities(state.endpoint)
        exact = tokens is not None or not self.ctx.counts_tokens()
        if exact and state.continues and open_part.kind in caps.continues:
            given = progress
            text = open_part.text if open_part.kind == "text" else ""
            if open_part.kind == "text" and not caps.verbatim_prefix:
                # Templates trim a prefilled turn's trailing whitespace (Anthropic refuses it): send it
                # without, and drop it from the continuation's start (``_ws_debt``).
                text = open_part.text.rstrip()
                given = replace(progress, parts=[*progress.parts[:-1], replace(open_part, text=text)])
            call = backend.continuation(self.ctx.request, state.endpoint, given, tokens)
            if call is not None:
                return call, "prefill", text
        # A replay: exact whenever it reproduces what was sent (checked character by character), which a
        # greedy or seeded answer does; one that differs is refused at its first differing character.
        return backend.build(self.ctx.request, state.endpoint, usage=self.ctx.usage_needed()), "replay", ""

    async def _continue(self, exc: Exception) -> str | None:
        """Move the stream to another backend that can continue it; why not, when none can."""
        router, ctx = self.router, self.ctx
        failed = self.state
        self._let_go()
        self.resp.abort()
        endpoint = failed.endpoint.id
        if self.progress.finish is not None and self._checking is None:
            # It broke after the finish (before its end event): the answer is whole; end it here.
            log.info("stream from %s broke after its finish: ended by the gateway", endpoint)
            self.done = True
            self.out.append(self._encoder_end())
            return None
        if isinstance(exc, ContinuationRefused):
            ctx.refused.add(endpoint)  # it works, it just cannot continue: not a failure of its health
            router.metrics.attempt(endpoint, "restarted")
            log.warning("%s cannot continue this stream: %s", endpoint, exc)
        else:
            log.warning("stream from %s broke after %d chunks: %s", endpoint, self.progress.chunks, exc)
            ctx.broke[endpoint] = router.clock()
            router.note_failure(ctx, failed, exc, hard=True)
        tokens = self._tokens_sent()
        why = self._blocker(tokens)
        if why is not None:
            return why
        limit = ctx.token_limit()
        if limit is not None and tokens is not None and tokens >= limit:
            self._finish_locally("length", tokens)  # the limit was reached exactly, by the backend's count
            return None
        # Cut during a replay: the client has the parts sent before it plus what it forwarded, all of
        # which ``self.progress`` holds; the next backend is checked against that.
        self._replay = None
        chain = router.stream_chain(ctx, failed.endpoint.model)
        # Any backend of the chain may take the stream: one that continues natively gets a prefill,
        # any other a replay (``_call``).
        waited = False
        while self.continuations < router.max_continuations and router.clock() < ctx.deadline:
            state = router.pick_for_stream(ctx, chain) if router.usable(ctx, chain) else None
            if state is None:
                if not waited and router.reachable(ctx, chain):
                    waited = True  # every backend it may go to is out: hold it for one to come back
                    if await router.wait_for_stream(ctx, chain):
                        continue
                break
            call, mode, given = self._call(state, tokens)
            self.continuations += 1
            ctx.attempts += 1
            ctx.tried.add(state.endpoint.id)
            state.outstanding += 1
            router.observer_of(ctx).attempt_start(ctx, state, CONTINUATION)
            try:
                extra = upstream_headers(router.observer_of(ctx), ctx, state)
                resp = await router.open(state, call, True, ctx.deadline, extra)
            except UpstreamStatus as err:
                state.outstanding -= 1
                verdict = router.classify(state, err)
                if verdict == "client" or (400 <= err.status < 500 and verdict != "throttled"):
                    # "I cannot continue this": true of this request, says nothing about its health.
                    ctx.refused.add(state.endpoint.id)
                    router.metrics.attempt(state.endpoint.id, f"status_{err.status}")
                    log.warning("%s refused to continue the stream: %s", state.endpoint.id, err)
                else:
                    ctx.broke[state.endpoint.id] = router.clock()
                    router.note_failure(ctx, state, err, hard=True)
                continue
            except UpstreamError as err:
                state.outstanding -= 1
                ctx.broke[state.endpoint.id] = router.clock()
                router.note_failure(ctx, state, err, hard=True)
                log.warning("continuation on %s failed: %s", state.endpoint.id, err)
                continue
            except BaseException:  # the client went away while the continuation was being opened
                state.outstanding -= 1
                raise
            self._switch(state, resp, mode, given, tokens)
            router.observer_of(ctx).continued(
                ctx, failed, state, tokens if tokens is not None else self.progress.chunks
            )
            return None
        return "no backend could continue it"

    #: Output tokens the client had at a break during a replay (the replay's own count is of the whole).
    _replayed_tokens: int | None = None

    def _switch(
        self, state: EndpointState, resp: UpstreamResponse, mode: str, given: str, tokens: int | None
    ) -> None:
        """The stream goes on from ``resp`` (on ``state``), in ``mode``."""
        self._resume_if_passed()  # the client got the first part as the backend's bytes
        self.resp = resp
        self._hold(state)
        self.backend = self.router.backend(state.endpoint)
        self.decoder = self.backend.decoder()
        self.segment += 1
        self.mode = mode
        self.progress.new_segment()
        self.backends.append(state.endpoint.id)
        self._checking, self._checked_text, self._ws_debt, self._tool_shift = None, "", "", None
        self._opened_continued = False
        self._replay = None
        if mode == "replay":
            self.base_tokens = 0
            self._replayed_tokens = tokens
            self._replay = Replay(self.progress.parts, state.endpoint.id)
        else:
            self.base_tokens = tokens
            open_part = self.progress.open_part
            if open_part is not None and open_part.kind == "text":
                self._ws_debt = open_part.text[len(given) :]
                self._prefix_norm = normalized(given)
                if given.strip() and not repeats_itself(given):
                    self._checking = []
        self.ctx.rescued += 1
        self.router.metrics.rescued.inc()

    def _finish_locally(self, reason: str, tokens: int) -> None:
        """End the stream ourselves when the token limit was reached exactly at the failure.

        Only called with ``tokens`` counted by the backends' usage, never estimated from chunks.
        """
        self._resume_if_passed()
        self.progress.finish = Finish(reason)
        self.out.append(self.encoder.encode(Finish(reason)))
        usage = self.progress.usage
        if usage is not None:
            prompt = usage.input_tokens
            if prompt is not None and self.mode == "prefill":
                prompt = max(0, prompt - (self.base_tokens or 0))
            self.encoder.encode(Usage(prompt, tokens, usage.cached_input_tokens))
        self.out.append(self._encoder_end())
        self.done = True
