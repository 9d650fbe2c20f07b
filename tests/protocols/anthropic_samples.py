"""Anthropic wire samples shaped like real captures: a streamed answer and a coding agent's request."""

from __future__ import annotations

import json
from typing import Any


def frame(data: str) -> bytes:
    """One event framed as Anthropic's API frames it: ``event: <type>``, then the JSON as given."""
    return b"event: " + json.loads(data)["type"].encode() + b"\ndata: " + data.encode() + b"\n\n"


#: A streamed answer with a thinking block, text (multi-byte characters), a ping, and a streamed tool call,
#: as Anthropic's API sends it (compact JSON, but ping's has a space; the same field order).
CAPTURED_STREAM = b"".join(
    frame(data)
    for data in (
        '{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message",'
        '"role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,'
        '"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":100,'
        '"cache_read_input_tokens":2048,"output_tokens":2,"service_tier":"standard"}}}',
        '{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"",'
        '"signature":""}}',
        '{"type": "ping"}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
        '"thinking":"The user wants the weather in München."}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
        '"thinking":" I should call the tool."}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta",'
        '"signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}',
        '{"type":"content_block_stop","index":0}',
        '{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}',
        '{"type":"content_block_delta","index":1,"delta":{"type":"text_delta",'
        '"text":"Checking München 🌍 — one moment.\\n    indented"}}',
        '{"type":"content_block_stop","index":1}',
        '{"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
        '"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}',
        '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}',
        '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
        '"partial_json":"{\\"location\\": \\"Mün"}}',
        '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
        '"partial_json":"chen\\", \\"unit\\": \\"celsius\\"}"}}',
        '{"type":"content_block_stop","index":2}',
        '{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
        '"usage":{"output_tokens":89}}',
        '{"type":"message_stop"}',
    )
)

CAPTURED_TEXT = "Checking München 🌍 — one moment.\n    indented"
CAPTURED_THINKING = "The user wants the weather in München. I should call the tool."
CAPTURED_SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
CAPTURED_ARGUMENTS = '{"location": "München", "unit": "celsius"}'

BETAS = [
    "claude-code-20250219",
    "oauth-2025-04-20",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
    "context-management-2025-06-27",
    "prompt-caching-scope-2026-01-05",
    "effort-2025-11-24",
    "advanced-tool-use-2025-11-20",
    "web-search-2025-03-05",
    "files-api-2025-04-14",
    "token-efficient-tools-2025-02-19",
    "mcp-client-2025-04-04",
]


def _schema(i: int) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "description": f"The absolute path to the file {i} operates on. " * 4},
            "offset": {
                "type": "integer",
                "minimum": 0,
                "description": "The line number to start reading from.",
            },
            "limit": {
                "type": "integer",
                "exclusiveMinimum": 0,
                "description": "The number of lines to read.",
            },
            "mode": {"type": "string", "enum": ["read", "write", "append"]},
        },
    }


def coding_agent_request() -> dict[str, Any]:
    """A coding agent's ``/v1/messages?beta=true`` body: 25 tools, adaptive thinking, mid-turn system
    messages, tool use and results, thinking kept across turns, cache breakpoints, ~85 KB."""
    tools: list[dict[str, Any]] = [
        {
            "name": f"Tool{i:02d}",
            "description": f"Tool {i}: reads, edits or searches files in the workspace. " * 22,
            "input_schema": _schema(i),
        }
        for i in range(24)
    ]
    tools[23]["cache_control"] = {"type": "ephemeral"}
    tools.insert(5, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5})
    code = "def handler(event):\n    if not event:\n        return None\n    return {'ok': True}\n" * 160
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>\nThe workspace is /repo.\n</system-reminder>"},
                {
                    "type": "text",
                    "text": "Fix the failing test in handler.py",
                    "cache_control": {"type": "ephemeral"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "I need to read the file first.",
                    "signature": "EuYBCkQYAiJA" * 8,
                },
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIw" * 3},
                {"type": "text", "text": "Let me look at the file."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "Tool00",
                    "input": {"path": "/repo/handler.py"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": code},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=" * 200},
                },
            ],
        },
        {"role": "system", "content": "The user has switched to plan mode. Do not edit files."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_01B", "name": "Tool01", "input": {"path": "/repo/test.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [{"type": "text", "text": code}],
                    "is_error": False,
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "notes " * 500},
                    "title": "notes.txt",
                },
                {"type": "search_result", "source": "https://example.com", "title": "t", "content": []},
            ],
        },
        {"role": "system", "content": [{"type": "text", "text": "Plan mode is over."}]},
        {"role": "user", "content": "Go on, and keep the indentation."},
    ]
    return {
        "model": "claude-opus-4-6",
        "max_tokens": 32000,
        "messages": messages,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {
                "type": "text",
                "text": "Follow the repository's conventions. " * 120,
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": tools,
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive"},
        "metadata": {"user_id": "user_2f0c_account_9a1b_session_77de"},
        "stream": True,
        "temperature": 1,
        "context_management": {
            "edits": [
                {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 120000}}
            ]
        },
        "output_config": {"effort": "high"},
        "service_tier": "auto",
        "container": None,
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}],
        "speed": "standard",
    }


def body_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()
