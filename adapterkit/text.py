"""Strings that come from files, made safe to show: no control character, newline or escape sequence reaches a
terminal, a log or a model card as itself, so a manifest cannot forge a line of ``inspect`` or move the cursor."""

from __future__ import annotations

import unicodedata

#: Unicode categories never shown as is: controls (C0, DEL, C1), format characters (bidi overrides, zero-width
#: spaces), lone surrogates, line and paragraph separators
HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` as one line with nothing invisible: a newline becomes ``\\n``, other control and format characters
    ``\\xNN`` or ``\\uXXXX``."""
    text = str(text)
    if text.isascii() and text.isprintable():  # the usual case
        return text
    return "".join(_escape(c) if unicodedata.category(c) in HIDDEN else c for c in text)


def _escape(char: str) -> str:
    if char in SHORT_ESCAPES:
        return SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
