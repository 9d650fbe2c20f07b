"""What the client has been sent of one answer, as canonical parts: enough to continue it elsewhere.

The relay feeds every canonical event of the stream to :meth:`Progress.observe`. Choice 0 is tracked as
an ordered list of :class:`Part` s — a thinking block, text, a tool call, ... — each with exactly the
characters sent. A backend adapter turns that into a prefilled assistant turn (native continuation), or
the relay replays: it asks for the whole answer again and checks, part by part, that the new answer
repeats these characters before it forwards anything (:class:`Replay`).

Tokens are counted from the backend's usage, never from chunks: one chunk may carry several tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skyfabric.protocols.canonical import (
    Event,
    Finish,
    Logprobs,
    PartEnd,
    PartStart,
    ReasoningDelta,
    ReasoningSignature,
    RedactedReasoning,
    Start,
    TextDelta,
    ToolCallDelta,
    Usage,
)


@dataclass(slots=True)
class Part:
    """One block of the answer: ``text``, ``reasoning``, ``redacted`` or ``tool``."""

    kind: str
    text: str = ""  # the text, the thinking, or the tool call's arguments (JSON text) so far
    id: str | None = None  # tool call id
    name: str | None = None  # tool name
    index: int = 0  # tool call index within the choice
    signature: str | None = None  # a thinking block's signature (its end)
    data: str | None = None  # redacted thinking
    #: The client saw this part's block end (it is whole: nothing may be added to it).
    closed: bool = False


@dataclass(slots=True)
class Progress:
    """Choice 0 of one answer as the client has it; :attr:`blocker` says when it cannot be continued."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    parts: list[Part] = field(default_factory=list)
    finish: Finish | None = None
    #: The current backend's usage so far (cumulative as it reported it), and whether it ever said any.
    usage: Usage | None = None
    #: Events with content, over all segments (for logs; not a token count).
    chunks: int = 0
    seg_chunks: int = 0
    blocker: str | None = None

    def observe(self, event: Event) -> bool:
        """Record one event; True when it carries content or a finish (the stream is past its first token)."""
        if isinstance(event, TextDelta):
            if event.choice != 0:
                self.blocker = "several choices"
                return True
            if event.text:
                self._part("text").text += event.text
                self._count()
            return bool(event.text)
        if isinstance(event, ToolCallDelta):
            if event.choice != 0:
                self.blocker = "several choices"
                return True
            last = self.parts[-1] if self.parts else None
            if last is None or last.kind != "tool" or last.index != event.index or last.closed:
                last = Part("tool", id=event.id, name=event.name, index=event.index)
                self.parts.append(last)
            else:
                last.id = last.id or event.id
                last.name = last.name or event.name
            last.text += event.arguments
            self._count()
            return True
        if isinstance(event, ReasoningDelta):
            if event.choice != 0:
                self.blocker = "several choices"
                return True
            if event.text:
                part = self._part("reasoning")
                if part.signature is not None:  # a signed block is closed: this is a new one
                    part = Part("reasoning")
                    self.parts.append(part)
                part.text += event.text
                self._count()
            return bool(event.text)
        if isinstance(event, ReasoningSignature):
            if event.choice == 0:
                self._part("reasoning").signature = event.signature
            return True
        if isinstance(event, RedactedReasoning):
            if event.choice == 0:
                self.parts.append(Part("redacted", data=event.data))
                self._count()
            return True
        if isinstance(event, Finish):
            if event.choice == 0:
                self.finish = event
            return True
        if isinstance(event, PartStart):
            if event.choice == 0:
                self.parts.append(Part(event.kind))
            return False
        if isinstance(event, PartEnd):
            if event.choice == 0 and self.parts:
                self.parts[-1].closed = True
            return False
        if isinstance(event, Usage):
            self.usage = event
            return False
        if isinstance(event, Start):
            if self.id is None:
                self.id, self.model, self.created = event.id, event.model, event.created
            return False
        if isinstance(event, Logprobs):
            self.blocker = "logprobs"
            return False
        return False

    def _part(self, kind: str) -> Part:
        last = self.parts[-1] if self.parts else None
        if last is None or last.kind != kind or last.closed:
            self.parts.append(Part(kind))
        return self.parts[-1]

    def _count(self) -> None:
        self.chunks += 1
        self.seg_chunks += 1

    def new_segment(self) -> None:
        """Another backend takes over: its usage counts from zero."""
        self.seg_chunks = 0
        self.usage = None

    @property
    def segment_tokens(self) -> int | None:
        """Output tokens of the current backend's part, exactly, or None when not known."""
        if self.usage is not None and self.usage.output_tokens is not None:
            return self.usage.output_tokens
        return 0 if self.seg_chunks == 0 else None

    @property
    def text(self) -> str:
        """All text parts, joined (the answer's visible text)."""
        return "".join(p.text for p in self.parts if p.kind == "text")

    @property
    def open_part(self) -> Part | None:
        """The part a break cut (the last one), if any."""
        return self.parts[-1] if self.parts else None
