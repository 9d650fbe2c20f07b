"""OpenAI's wire shapes (as vLLM's server writes them) for structured answers' pieces.

Streamed: ``delta.reasoning_content`` (vLLM's field), ``delta.content``, and a tool call as vLLM streams
one: first ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``, then
``{"index", "function": {"arguments": "<fragment>"}}``. A continuation of a call the client already has
sends no second id/name chunk: only further argument fragments for the same index, so no conflicting call
ever appears. Non-streamed: ``message.reasoning_content``, ``message.content`` (``null`` with a tool
call), ``message.tool_calls`` with the whole arguments string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skyfabric.engine.structured import Piece


@dataclass(frozen=True, slots=True)
class StructuredShape:
    """What the wire needs besides the pieces: each choice's call id, the call's index, the tool's name."""

    call_ids: list[str]
    call_index: int
    tool_name: str | None

    def delta(self, piece: Piece, choice: int) -> dict[str, Any]:
        """The chunk's ``delta`` for one piece ({} when it carries nothing to show)."""
        if piece.kind == "reasoning":
            return {"reasoning_content": piece.text} if piece.text else {}
        if piece.kind == "content":
            return {"content": piece.text} if piece.text else {}
        if piece.kind == "call":
            call = {
                "index": self.call_index,
                "id": self.call_ids[choice],
                "type": "function",
                "function": {"name": piece.text, "arguments": ""},
            }
            return {"tool_calls": [call]}
        if piece.text:  # arguments, or structure released with the finish
            return {"tool_calls": [{"index": self.call_index, "function": {"arguments": piece.text}}]}
        return {}


@dataclass(slots=True)
class StructuredMessage:
    """A non-streamed choice, accumulated from its pieces."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    arguments: list[str] | None = None
    finish: str | None = None

    def add(self, piece: Piece) -> None:
        if piece.kind == "reasoning":
            self.reasoning.append(piece.text)
        elif piece.kind == "content":
            self.content.append(piece.text)
        elif piece.kind == "call":
            self.arguments = []
        elif piece.text:
            if self.arguments is None:
                self.arguments = []
            self.arguments.append(piece.text)
        if piece.finish_reason is not None:
            self.finish = piece.finish_reason

    def message(self, shape: StructuredShape, choice: int) -> dict[str, Any]:
        calls = self.arguments is not None or shape.tool_name is not None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls else "".join(self.content),
            "refusal": None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = [
                {
                    "id": shape.call_ids[choice],
                    "type": "function",
                    "function": {"name": shape.tool_name or "", "arguments": "".join(self.arguments or [])},
                }
            ]
        return message
