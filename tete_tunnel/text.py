"""Text from the network, made fit for a terminal.

A peer (or a stranger) chooses the bytes of a refusal reason, a host name or anything else
that ends up in a log line. Printed raw, ESC and friends would let it erase lines, move the
cursor, set the window title or paint a fake "Connected to peer!"; bidi overrides would let
it reorder what is shown. Every control, format, surrogate, private-use and unassigned
character is therefore shown as an escape (`\\x1b`, `\\u202e`), so the text stays readable and
cannot act on the terminal.
"""

from __future__ import annotations

import unicodedata

_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def safe(text: str) -> str:
    """`text` with every character that could act on a terminal written as an escape."""
    if text.isascii() and text.isprintable():
        return text  # the common case, and cheap
    out = []
    for ch in text:
        if unicodedata.category(ch) in _UNSAFE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def safe_lines(text: str) -> str:
    """Like `safe`, keeping line breaks (for a traceback at -vv)."""
    return "\n".join(safe(line) for line in text.split("\n"))
