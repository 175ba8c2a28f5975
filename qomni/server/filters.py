"""Output filters over the model's text as it streams: a Thinking model's reasoning apart from its
answer, and Hermes-style `<tool_call>` blocks as OpenAI tool calls. (Stop strings are the
engine's: it cuts the text, and the speech, before them.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qomni.server.wire import new_id

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def parse_tool_call(block: str) -> dict[str, Any] | None:
    """The JSON inside one `<tool_call>...</tool_call>` block -> an OpenAI tool call, or None
    when it is not a {"name": str, "arguments": ...} object."""
    try:
        obj = json.loads(block.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": new_id("call_"), "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Whole-text form of `OutputFilter` with tools on: (content, tool calls)."""
    f = OutputFilter(parse_tools=True)
    pieces = f.push(text) + f.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, dict)]
    return (content.strip() if calls else content), calls


@dataclass
class Reasoning:
    """A piece of a Thinking model's reasoning (OpenAI-style `reasoning_content`)."""

    text: str


class ReasoningSplitter:
    """Splits a Thinking model's text into its reasoning and its answer, incrementally.

    The Thinking template's generation prompt leaves `<think>` to the model: everything before
    `</think>` is reasoning (a leading `<think>` is dropped), everything after is the answer.
    Partial tags, and whitespace that might end the reasoning, are held back until decided, so
    the joined pieces do not depend on how the text was chunked. `push` returns `Reasoning`
    pieces and answer strings; a reply cut before `</think>` is all reasoning.
    """

    def __init__(self) -> None:
        self.buf = ""
        self.opened = False  # past a possible leading <think>
        self.closed = False  # past </think>
        self.reasoning_started = False  # a non-blank reasoning character was sent
        self.answer_started = False  # a non-blank answer character was sent

    def push(self, text: str) -> list[Reasoning | str]:
        if self.closed:
            return self._answer(text)
        self.buf += text
        if not self.opened:
            head = self.buf.lstrip()
            if len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                return []  # could still become "<think>"
            self.opened = True
            self.buf = head[len(THINK_OPEN):] if head.startswith(THINK_OPEN) else self.buf
        end = self.buf.find(THINK_CLOSE)
        if end >= 0:
            reasoning, rest = self.buf[:end], self.buf[end + len(THINK_CLOSE):]
            self.buf, self.closed = "", True
            return self._reasoning(reasoning.rstrip()) + self._answer(rest)
        keep = next((n for n in range(min(len(THINK_CLOSE) - 1, len(self.buf)), 0, -1)
                     if self.buf.endswith(THINK_CLOSE[:n])), 0)
        ready = self.buf[:len(self.buf) - keep]
        ready = ready.rstrip()  # trailing blanks wait: they may be the last before </think>
        self.buf = self.buf[len(ready):]
        return self._reasoning(ready)

    def finish(self) -> list[Reasoning | str]:
        out, self.buf = self.buf, ""
        return [] if self.closed else self._reasoning(out.rstrip())

    def _reasoning(self, text: str) -> list[Reasoning | str]:
        if not self.reasoning_started:
            text = text.lstrip()
            self.reasoning_started = bool(text)
        return [Reasoning(text)] if text else []

    def _answer(self, text: str) -> list[Reasoning | str]:
        if not self.answer_started:
            text = text.lstrip()
            self.answer_started = bool(text)
        return [text] if text else []


class OutputFilter:
    """Incremental tool-call parsing of the model's text. `push(delta)` returns pieces that are
    safe to emit: str (content) or dict (a complete OpenAI tool call). Text that could still
    become a `<tool_call>` tag is held back until it can be decided. Once a `<tool_call>` opens,
    `in_tools` is True; whitespace between calls is dropped. (Stop strings are the engine's:
    it cuts the text, and the speech, before them.)
    """

    def __init__(self, parse_tools: bool):
        self.markers = [TOOL_OPEN] if parse_tools else []
        self.buf = ""
        self.in_tools = False  # a tool call has started
        self._inside = False  # currently inside an unterminated <tool_call> block
        self._gap = ""  # whitespace before the open block: dropped unless the block is not JSON

    def push(self, text: str) -> list[str | dict]:
        self.buf += text
        out: list[str | dict] = []
        while self.buf:
            if self._inside:
                end = self.buf.find(TOOL_CLOSE)
                if end < 0:
                    break
                self._emit_call(self.buf[:end], out)
                self.buf, self._inside = self.buf[end + len(TOOL_CLOSE):], False
                continue
            i = self.buf.find(TOOL_OPEN) if self.markers else -1
            if i < 0:
                keep = self._partial_tail()
                self._content(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            head = self.buf[:i].rstrip()
            self._content(head, out)
            self._gap = self.buf[len(head):i]
            self.buf, self._inside, self.in_tools = self.buf[i + len(TOOL_OPEN):], True, True
        return out

    def finish(self) -> list[str | dict]:
        """Flush what is held back at the end of generation (an unterminated tool call is
        parsed if it is complete JSON, else returned as text)."""
        out: list[str | dict] = []
        if self._inside:
            if parse_tool_call(self.buf) is not None:
                self._emit_call(self.buf, out)
            else:
                out.append(self._gap + TOOL_OPEN + self.buf)
        else:
            self._content(self.buf, out)
        self.buf, self._inside = "", False
        return out

    def _content(self, text: str, out: list) -> None:
        if text and not (self.in_tools and not text.strip()):
            out.append(text)

    def _emit_call(self, block: str, out: list) -> None:
        call = parse_tool_call(block)
        out.append(call if call is not None else self._gap + TOOL_OPEN + block + TOOL_CLOSE)

    def _partial_tail(self) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some marker (with
        tools, plus the whitespace before it: that belongs to no one if a tool call follows)."""
        best = 0
        for m in self.markers:
            for n in range(min(len(m) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(m[:n]):
                    best = n
                    break
        if TOOL_OPEN in self.markers:
            head = self.buf[:len(self.buf) - best]
            best += len(head) - len(head.rstrip())
        return best
