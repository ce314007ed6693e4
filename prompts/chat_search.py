"""Search across saved conversations: their titles and the text of their messages, case-insensitively.

Each conversation found is one hit, with a one-line snippet around its first match in the messages (the title is
shown beside it anyway), so a list of hits reads like a search engine's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from prompts.conversations import Conversation

SNIPPET_CONTEXT = 40   # characters of context on each side of the match
MAX_HITS = 50


@dataclass(frozen=True)
class SearchHit:
    id: str
    title: str
    snippet: str    # one line: the first match in the messages with some context, or the title's
    matches: int    # how many times the query occurs in this conversation (title and messages)


def pattern_for(query: str) -> re.Pattern | None:
    """The query as a case-insensitive pattern; its spaces match any run of whitespace (a line break too)."""
    words = query.split()
    if not words:
        return None
    return re.compile(r"\s+".join(re.escape(w) for w in words), re.IGNORECASE)


def search(conversations: Iterable[Conversation], query: str, limit: int = MAX_HITS) -> list[SearchHit]:
    """The conversations whose title or messages hold `query`, in the order given (the store lists newest
    first), at most `limit` of them."""
    pattern = pattern_for(query)
    if pattern is None:
        return []
    hits = []
    for conv in conversations:
        texts = [m["content"] for m in conv.messages]
        matches = sum(len(pattern.findall(t)) for t in [conv.title, *texts])
        if not matches:
            continue
        first = next(((t, m) for t in texts if (m := pattern.search(t))), None)
        text, match = first if first else (conv.title, pattern.search(conv.title))
        hits.append(SearchHit(conv.id, conv.title, snippet(text, match.start(), match.end()), matches))
        if len(hits) >= limit:
            break
    return hits


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def snippet(text: str, start: int, end: int, context: int = SNIPPET_CONTEXT) -> str:
    """text[start:end] on one line with up to `context` characters either side, "…" where the text goes on."""
    # Whitespace runs shrink to one space, so take generously before shortening to `context`.
    before = _one_line(text[max(0, start - 4 * context):start])
    after = _one_line(text[end:end + 4 * context])
    lead = "…" + before[-context:].lstrip() if len(before) > context or start > 4 * context else before.lstrip()
    tail = after[:context].rstrip() + "…" if len(after) > context or end + 4 * context < len(text) else after.rstrip()
    return lead + _one_line(text[start:end]) + tail
