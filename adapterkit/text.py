"""Strings that come from files, made safe to show: no control character, newline or escape sequence reaches a
terminal (or a model card) as itself, so a manifest cannot forge a line of ``inspect`` or move the cursor."""

from __future__ import annotations

import re

#: C0 and C1 controls, DEL, and Unicode's line/paragraph separators and bidirectional overrides
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every unsafe character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return UNSAFE.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
