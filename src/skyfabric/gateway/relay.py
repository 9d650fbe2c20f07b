"""Relays one SSE stream to the client and, when its backend fails mid-answer, continues it elsewhere.

Past the commit point (the first token sent) a failure — reset, stall beyond the idle timeout, malformed
event, in-band error, or an end without a finish reason — does not reach the client. The relay asks
another backend that declares it can continue (vLLM's ``continue_final_message`` for chat, the prompt
itself for completions) to go on from exactly the text already sent, and splices its events into the
same stream: same ``id`` and ``created``, the continuation's role-only opening chunk dropped, usage
counting both parts. When no capable backend is left the client gets an in-band error event, never a
truncated stream that looks finished.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from skyfabric.core.errors import RemoteProtocolError, UpstreamError
from skyfabric.gateway.api_errors import error_event
from skyfabric.gateway.balancer import EndpointState, record_success
from skyfabric.gateway.context import RequestContext
from skyfabric.gateway.sse import DONE, EventSplitter, MalformedEvent, StreamProgress, parse_event
from skyfabric.http.client import UpstreamResponse

if TYPE_CHECKING:
    from skyfabric.gateway.proxy import Proxy

log = logging.getLogger("skyfabric.gateway.relay")

_DONE_EVENT = b"data: [DONE]\n\n"


class StreamRelay:
    """One client stream, possibly served by several backends in turn."""

    def __init__(self, proxy: Proxy, ctx: RequestContext, state: EndpointState, resp: UpstreamResponse):
        self.proxy = proxy
        self.ctx = ctx
        self.state = state
        self.resp = resp
        self.progress = StreamProgress(ctx.kind)
        self.splitter = EventSplitter()
        self.out: list[bytes] = []
        self.done = False
        self.segment = 0
        self.base_tokens = 0
        self.held = False
        self.continuations = 0
        options = ctx.body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        #: Backends that served a part of this stream, in order (for logs and the usage ledger).
        self.backends = [state.endpoint.id]

    # -- reading ----------------------------------------------------------------------------------------

    def _absorb(self, piece: bytes) -> bool:
        """Take upstream bytes; queue what the client should get. True when a token event was seen."""
        token = False
        for event in self.splitter.feed(piece):
            obj = parse_event(event)
            if obj is None:
                continue
            if obj is DONE:
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
                self.out.append(event + b"\n\n")
            else:
                token |= self._splice(obj)
        return token

    def _splice(self, obj: dict[str, Any]) -> bool:
        """A continuation chunk, rewritten to belong to the original stream."""
        choices = obj.get("choices") or []
        if self.ctx.kind == "chat" and choices:
            delta = choices[0].get("delta") or {}
            if delta.get("role") and not delta.get("content") and not choices[0].get("finish_reason"):
                return False
        token = self.progress.observe(obj)
        obj["id"] = self.progress.id
        if self.progress.created is not None:
            obj["created"] = self.progress.created
        usage = obj.get("usage")
        if usage:
            prompt = max(0, int(usage.get("prompt_tokens", 0)) - self.base_tokens)
            completion = int(usage.get("completion_tokens", 0)) + self.base_tokens
            obj["usage"] = {
                **usage,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        self.out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        return token

    async def prime(self) -> None:
        """Read up to the first token: the commit point. Failures before it raise for a plain retry."""
        timeouts = self.proxy.timeouts
        try:
            while True:
                remaining = max(0.001, self.ctx.deadline - self.proxy.clock())
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
        state.last_activity = self.proxy.clock()

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
        timeouts = self.proxy.timeouts
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
                    remaining = self.ctx.deadline - self.proxy.clock()
                    if remaining <= 0:
                        yield error_event(
                            "the request's deadline passed mid-stream", code="deadline_exceeded"
                        )
                        return
                    piece = await self.resp.next(min(timeouts.idle, remaining), "idle", sent_any=True)
                    self.state.last_activity = self.proxy.clock()
                    if piece is None:
                        if self.progress.finish_reason is not None:
                            # Complete but for [DONE]: finish it rather than fail a finished answer.
                            self.done = True
                            self.out.append(_DONE_EVENT)
                            continue
                        raise RemoteProtocolError("stream ended without a finish reason", sent_any=True)
                    self._absorb(piece)
                except (UpstreamError, MalformedEvent) as exc:
                    if not await self._continue(exc):
                        self.proxy.metrics.stream_errors.inc()
                        yield error_event(
                            f"the backend failed mid-stream and no backend could continue it: {exc}",
                            code="stream_interrupted",
                        )
                        return
        finally:
            if completed and self.held:
                record_success(self.state, self.proxy.clock())
                self.resp.release()
            else:
                self.resp.abort()
            self._let_go()
            self.proxy.observer.stream_end(self.ctx, self.state, self.progress.tokens, completed)
            self.ctx.finish()

    async def _drain(self) -> None:
        """Read the rest of the HTTP message after [DONE] so the connection can be reused."""
        if self.resp.released:
            return
        with contextlib.suppress(UpstreamError):
            while await self.resp.next(0.5) is not None:
                pass

    async def _continue(self, exc: Exception) -> bool:
        """Move the stream to another backend that can continue it; False when none can."""
        proxy, ctx = self.proxy, self.ctx
        failed = self.state
        log.warning("stream from %s broke after %d tokens: %s", failed.endpoint.id, self.progress.tokens, exc)
        self._let_go()
        self.resp.abort()
        proxy.note_failure(ctx, failed, exc, hard=True)
        chain = [ctx.model, *proxy.fleet.model(ctx.model).fallbacks]
        waited = False
        while self.continuations < proxy.max_continuations and proxy.clock() < ctx.deadline:
            need = bool(self.progress.content)
            if not waited and not proxy.any_available(chain, proxy.clock(), need):
                waited = True  # every capable backend is out: hold the stream for one to come back
                if await proxy.wait_for_endpoint(chain, ctx.deadline, need):
                    ctx.tried.clear()
                    ctx.failed_providers.clear()
            self.continuations += 1
            prefix, tokens = self.progress.content, self.progress.tokens
            state = None
            for model in chain:
                state = proxy.clusters[model].pick(
                    proxy.clock(),
                    avoid_endpoints=ctx.tried,
                    avoid_providers=ctx.failed_providers,
                    need_continuation=bool(prefix),
                    cooldowns=proxy.cooldowns,
                )
                if state is not None:
                    break
            if state is None:
                if not waited and await proxy.wait_for_endpoint(chain, ctx.deadline, bool(prefix)):
                    waited = True
                    ctx.tried.clear()
                    ctx.failed_providers.clear()
                    continue
                break
            body = ctx.continuation_body(state.endpoint, prefix, tokens)
            ctx.attempts += 1
            ctx.tried.add(state.endpoint.id)
            if body is None:
                self._finish_locally("length")
                return True
            state.outstanding += 1
            proxy.observer.attempt_start(ctx, state, "continuation")
            try:
                extra = proxy.observer.upstream_headers(ctx, state)
                resp = await proxy.open(state, ctx.path, body, True, ctx.deadline, extra)
            except UpstreamError as err:
                state.outstanding -= 1
                proxy.note_failure(ctx, state, err, hard=True)
                log.warning("continuation on %s failed: %s", state.endpoint.id, err)
                continue
            self.resp = resp
            self._hold(state)
            self.splitter = EventSplitter()
            self.segment += 1
            self.base_tokens = tokens
            self.backends.append(state.endpoint.id)
            ctx.rescued += 1
            proxy.metrics.rescued.inc()
            proxy.observer.continued(ctx, failed, state, tokens)
            return True
        return False

    def _finish_locally(self, reason: str) -> None:
        """End the stream ourselves when the token limit was reached exactly at the failure."""
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
        self.out.append(_DONE_EVENT)
        self.done = True
