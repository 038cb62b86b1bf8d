"""A cheap detector for the output of a broken model: empty text, broken UTF-8, byte soup, loops.

Each rule catches a failure seen in practice: a wrong tokenizer or dequantization gives U+FFFD or a flood
of unrelated scripts; a broken attention or rope repeats a short fragment or a single character.
"""

from __future__ import annotations

import re
from collections import Counter

MAX_NON_ASCII = 0.60
MAX_ONE_CHAR = 0.90
# a 4-16 byte fragment repeated 3+ times in a row (the fragment, then two more copies)
_REPEAT = re.compile(rb"(.{4,16}?)\1\1", re.S)
_WORDISH = re.compile(rb"[A-Za-z0-9\x80-\xff]")


def gibberish_reason(text: str) -> str | None:
    """Why `text` looks like gibberish, or None when it reads as text."""
    if not text.strip():
        return "empty output"
    if "\ufffd" in text:
        return "contains U+FFFD (broken UTF-8)"
    non_ascii = sum(ord(c) > 127 for c in text) / len(text)
    if non_ascii > MAX_NON_ASCII:
        return f"{non_ascii:.0%} of the characters are non-ASCII"
    fragment = repeated_fragment(text)
    if fragment is not None:
        return f"fragment {fragment!r} repeated 3+ times in a row"
    char, count = Counter(text).most_common(1)[0]
    if count >= MAX_ONE_CHAR * len(text):
        return f"{char!r} is {count / len(text):.0%} of the text"
    return None


def repeated_fragment(text: str) -> str | None:
    """The first 4-16 byte fragment that occurs 3+ times in a row. Fragments without a letter or digit
    (code indentation, `----` rules, runs of spaces) are legitimate text and do not count."""
    data = text.encode("utf-8")
    pos = 0
    while m := _REPEAT.search(data, pos):
        if _WORDISH.search(m.group(1)):
            return m.group(1).decode("utf-8", errors="replace")
        pos = m.start() + 1
    return None


def is_gibberish(text: str) -> bool:
    return gibberish_reason(text) is not None
