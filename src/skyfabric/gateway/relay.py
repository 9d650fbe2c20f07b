"""Relays one SSE stream to the client and, when its backend fails mid-answer, continues it elsewhere.

Past the commit point (the first token sent) a failure — reset, stall beyond the idle timeout, malformed
event, in-band error, or an end without a finish reason — does not reach the client. The relay asks
another backend that can continue (vLLM's ``continue_final_message`` for chat, the prompt itself for
completions) to go on from exactly the text already sent, and splices its events into the same stream:
same ``id`` and ``created``, the continuation's role-only opening chunk dropped, usage counting both
parts. When no capable backend is left, or the stream holds what a continuation cannot reproduce (several
choices, tool calls, reasoning, log-probabilities, a token-id prompt, or a token count the backends did not
report), the client gets an in-band error event, never a truncated stream that looks finished.

Which backends may take the stream over: not one that refused to continue this request (a 4xx to the
continuation, or an answer that restarted instead of continuing), and not one that broke it unless it has
answered a probe since. A continuation's first characters are held back until they show that they do not
repeat the prefix (see :func:`restart_verdict`), so a backend that ignores the prefix never makes the client
receive the same text twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from skyfabric.core.errors import ContinuationRefused, RemoteProtocolError, UpstreamError, UpstreamStatus
from skyfabric.gateway.api_errors import error_event
from skyfabric.gateway.balancer import EndpointState, record_success
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.observe import CONTINUATION
from skyfabric.gateway.router import Router, hold
from skyfabric.gateway.sse import DONE, EventSplitter, MalformedEvent, StreamProgress, parse_event
from skyfabric.http.client import UpstreamResponse

log = logging.getLogger("skyfabric.gateway.relay")

_DONE_EVENT = b"data: [DONE]\n\n"

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


def _text_of(choice: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        delta = choice.get("delta") or {}
        content = delta.get("content")
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


class StreamRelay:
    """One client stream, possibly served by several backends in turn."""

    def __init__(self, router: Router, ctx: RequestContext, state: EndpointState, resp: UpstreamResponse):
        self.router = router
        self.ctx = ctx
        self.state = state
        self.resp = resp
        self.progress = StreamProgress(ctx.kind)
        self.splitter = EventSplitter()
        self.out: list[bytes] = []
        self.done = False
        self.segment = 0
        #: Completion tokens sent before the current backend's part, exactly (None: not counted).
        self.base_tokens: int | None = 0
        self.held = False
        self.continuations = 0
        self.include_usage, self.continuous_usage = ctx.client_usage()
        #: Usage the backend sends that the client did not ask for (the relay asks for it to count tokens).
        self._strip_usage = self._usage_added(state)
        #: While a continuation's first events are checked against the prefix: those events.
        self._checking: list[dict[str, Any]] | None = None
        self._checked_text = ""
        self._prefix_norm = ""
        #: Whitespace the client already has that the continuation's prefix left out (engines trim it).
        self._ws_debt = ""
        #: Backends that served a part of this stream, in order (for logs and the usage ledger).
        self.backends = [state.endpoint.id]

    def _usage_added(self, state: EndpointState) -> bool:
        """Whether the relay asked ``state`` for usage the client did not ask for."""
        return self.ctx.stream_options_for(state.endpoint) is not None

    # -- reading ----------------------------------------------------------------------------------------

    def _absorb(self, piece: bytes) -> bool:
        """Take upstream bytes; queue what the client should get. True when a token event was seen."""
        token = False
        for event in self.splitter.feed(piece):
            obj = parse_event(event)
            if obj is None:
                continue
            if obj is DONE:
                if self._checking is not None:
                    self._settle(final=True)
                if self.progress.finish_reason is None:
                    raise MalformedEvent("upstream sent [DONE] before any finish reason")
                self.done = True
                self.out.append(_DONE_EVENT)
                continue
            if "error" in obj and "choices" not in obj:
                message = obj["error"].get("message") if isinstance(obj["error"], dict) else obj["error"]
                raise RemoteProtocolError(f"upstream sent an in-band error: {message}")
            if self.segment == 0:
                token |= self.progress.observe(obj)
                if self._strip_usage and obj.get("usage"):
                    if not obj.get("choices"):
                        if self.include_usage:
                            self.out.append(event + b"\n\n")
                        continue  # the usage chunk the client did not ask for
                    if not self.continuous_usage:
                        del obj["usage"]
                        self.out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
                        continue
                self.out.append(event + b"\n\n")
            elif self._checking is not None:
                self._check(obj)
            else:
                token |= self._splice(obj)
        return token

    def _check(self, obj: dict[str, Any]) -> None:
        """Hold a continuation's event until its text shows it continues the prefix (or restarted)."""
        assert self._checking is not None
        self._checking.append(obj)
        final = False
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._checked_text += _text_of(choice, self.ctx.kind)
                final = final or bool(choice.get("finish_reason"))
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
        for obj in held:
            self._splice(obj)

    def _splice(self, obj: dict[str, Any]) -> bool:
        """A continuation chunk, rewritten to belong to the original stream."""
        choices = obj.get("choices") or []
        if choices and isinstance(choices[0], dict):
            first = choices[0]
            if self.ctx.kind == "chat":
                delta = first.get("delta") or {}
                if delta.get("role") and not delta.get("content") and not first.get("finish_reason"):
                    return False
            if self._ws_debt:
                self._pay_ws_debt(first)
        token = self.progress.observe(obj)
        obj["id"] = self.progress.id
        if self.progress.created is not None:
            obj["created"] = self.progress.created
        usage = obj.get("usage")
        if usage:
            wanted = self.continuous_usage if choices else self.include_usage
            if not wanted:
                if not choices:
                    return token
                del obj["usage"]
            else:
                base = self.base_tokens or 0
                prompt = max(0, int(usage.get("prompt_tokens", 0)) - base)
                completion = int(usage.get("completion_tokens", 0)) + base
                obj["usage"] = {
                    **usage,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
        self.out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        return token

    def _pay_ws_debt(self, choice: dict[str, Any]) -> None:
        """Drop from the continuation's start the whitespace the client already has."""
        key, holder = ("content", choice.get("delta")) if self.ctx.kind == "chat" else ("text", choice)
        if not isinstance(holder, dict):
            return
        text = holder.get(key)
        if not isinstance(text, str) or not text:
            return
        debt, i = self._ws_debt, 0
        while i < len(debt) and i < len(text) and debt[i] == text[i]:
            i += 1
        holder[key] = text[i:]
        self._ws_debt = debt[i:] if i == len(text) else ""

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
                    yield chunk
                if self.done:
                    completed = True
                    await self._drain()
                    return
                try:
                    remaining = self.ctx.deadline - self.router.clock()
                    if remaining <= 0:
                        yield error_event(
                            "the request's deadline passed mid-stream", code="deadline_exceeded"
                        )
                        return
                    piece = await self.resp.next(min(timeouts.idle, remaining), "idle", sent_any=True)
                    self.state.last_activity = self.router.clock()
                    if piece is None:
                        if self._checking is not None:
                            self._settle(final=True)
                        if self.progress.finish_reason is not None:
                            # Complete but for [DONE]: finish it rather than fail a finished answer.
                            self.done = True
                            self.out.append(_DONE_EVENT)
                            continue
                        raise RemoteProtocolError("stream ended without a finish reason", sent_any=True)
                    self._absorb(piece)
                except (UpstreamError, MalformedEvent) as exc:
                    why = await self._continue(exc)
                    if why is not None:
                        self.router.metrics.stream_errors.inc()
                        yield error_event(
                            f"the backend failed mid-stream and {why}: {exc}", code="stream_interrupted"
                        )
                        return
        finally:
            if completed and self.held:
                record_success(self.state, self.router.clock())
                self.resp.release()
            else:
                self.resp.abort()
            self._let_go()
            # Tokens by the backends' usage; where none reported it, the chunks (at least one token each).
            sent = self._tokens_sent()
            self.router.observer.stream_end(
                self.ctx, self.state, sent if sent is not None else self.progress.chunks, completed
            )
            self.ctx.finish()

    async def _drain(self) -> None:
        """Read the rest of the HTTP message after [DONE] so the connection can be reused."""
        if self.resp.released:
            return
        with contextlib.suppress(UpstreamError):
            while await self.resp.next(0.5) is not None:
                pass

    # -- continuation -----------------------------------------------------------------------------------

    def _tokens_sent(self) -> int | None:
        """Completion tokens the client has been sent, exactly (the backends' usage), or None."""
        part = self.progress.segment_tokens
        return None if self.base_tokens is None or part is None else self.base_tokens + part

    def _blocker(self, tokens: int | None) -> str | None:
        """Why the stream cannot be continued exactly, or None."""
        why = self.ctx.uncontinuable() or self.progress.blocker
        if why is not None:
            return f"a stream with {why} cannot be continued"
        if tokens is None and self.ctx.counts_tokens():
            return "the backend reported no usage, so the tokens sent are unknown and it cannot be continued"
        return None

    def _excluded(self) -> set[str]:
        """Endpoints this stream must not go to: refused it, or broke it and not probed since."""
        states = self.router.states
        out = set(self.ctx.refused)
        for endpoint, when in self.ctx.broke.items():
            state = states.get(endpoint)
            if state is None or state.probed_ok <= when:
                out.add(endpoint)
        return out

    def _usable(self, chain: list[str], need: bool) -> bool:
        """Whether an endpoint of ``chain`` that this stream may go to is in rotation now."""
        now, excluded = self.router.clock(), self._excluded()
        return any(
            s.available(now) and s.endpoint.id not in excluded and (s.continues or not need)
            for model in chain
            for s in self.router.clusters[model].states
        )

    async def _wait(self, chain: list[str], need: bool) -> bool:
        """Hold the stream (≤ ``retry.outage_wait``) for an endpoint it may go to to come back."""
        router = self.router
        return await hold(
            lambda: self._usable(chain, need), router.clock, self.ctx.deadline, router.fleet.retry.outage_wait
        )

    def _pick(self, chain: list[str], need: bool) -> EndpointState | None:
        router, excluded = self.router, self._excluded()
        for model in chain:
            state = router.clusters[model].pick(
                router.clock(),
                avoid_endpoints=excluded,
                avoid_providers=self.ctx.failed_providers,
                need_continuation=need,
                cooldowns=router.cooldowns,
            )
            if state is not None:
                return state
        return None

    async def _continue(self, exc: Exception) -> str | None:
        """Move the stream to another backend that can continue it; why not, when none can."""
        router, ctx = self.router, self.ctx
        failed = self.state
        self._let_go()
        self.resp.abort()
        endpoint = failed.endpoint.id
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
        content = self.progress.content
        prefix = content.rstrip()  # sent without trailing whitespace: templates trim it, or not
        need = bool(prefix)
        chain = router.stream_chain(ctx)
        waited = False
        while self.continuations < router.max_continuations and router.clock() < ctx.deadline:
            state = self._pick(chain, need) if self._usable(chain, need) else None
            if state is None:
                if not waited:
                    waited = True  # every backend it may go to is out: hold it for one to come back
                    if await self._wait(chain, need):
                        continue
                break
            # skyfabric's own replicas keep a continued prefix verbatim: send it whole there, since a
            # stripped one is re-tokenized differently and a token limit then ends the text elsewhere.
            given = content if state.endpoint.engine == "local" else prefix
            body = ctx.continuation_body(state.endpoint, given, tokens)
            if body is None:
                break
            self.continuations += 1
            ctx.attempts += 1
            ctx.tried.add(state.endpoint.id)
            state.outstanding += 1
            router.observer.attempt_start(ctx, state, CONTINUATION)
            try:
                extra = router.observer.upstream_headers(ctx, state)
                resp = await router.open(state, ctx.path, body, True, ctx.deadline, extra)
            except UpstreamStatus as err:
                state.outstanding -= 1
                if 400 <= err.status < 500 and err.status != 429:
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
            self.resp = resp
            self._hold(state)
            self.splitter = EventSplitter()
            self.segment += 1
            self.base_tokens = tokens
            self.progress.new_segment()
            self._strip_usage = self._usage_added(state)
            self._ws_debt = content[len(given) :]
            self._prefix_norm = normalized(given)
            check = bool(given.strip()) and not repeats_itself(given)
            self._checking, self._checked_text = ([], "") if check else (None, "")
            self.backends.append(state.endpoint.id)
            ctx.rescued += 1
            router.metrics.rescued.inc()
            sent = tokens if tokens is not None else self.progress.chunks
            router.observer.continued(ctx, failed, state, sent)
            return None
        return "no backend could continue it"

    def _finish_locally(self, reason: str, tokens: int) -> None:
        """End the stream ourselves when the token limit was reached exactly at the failure.

        Only called with ``tokens`` counted by the backends' usage, never estimated from chunks.
        """
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if self.ctx.kind == "chat":
            choice["delta"] = {}
            kind = "chat.completion.chunk"
        else:
            choice["text"] = ""
            kind = "text_completion"
        obj = {
            "id": self.progress.id,
            "object": kind,
            "created": self.progress.created,
            "model": self.ctx.body.get("model"),
            "choices": [choice],
        }
        self.progress.finish_reason = reason
        self.out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        usage = self.progress.usage
        if self.include_usage and usage is not None:
            prompt = max(0, int(usage.get("prompt_tokens", 0)) - (self.base_tokens or 0))
            obj["choices"] = []
            total = prompt + tokens
            obj["usage"] = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": total}
            self.out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        self.out.append(_DONE_EVENT)
        self.done = True
