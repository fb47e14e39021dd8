"""Ranking the user's own records against a prompt.

A ``Ranker`` turns documents into a ``RankIndex`` once, so that an embedding ranker can
pay for its embeddings at index time; the memory rebuilds the index only when its
records change. The default is lexical BM25 (``rank-bm25``), which needs no model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Protocol

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased Unicode word tokens (scripts without spaces stay one token per run)."""
    return _WORD.findall(text.lower())


class RankIndex(Protocol):
    """Documents prepared for search."""

    def search(self, query: str, candidates: Collection[int] | None = None) -> list[tuple[int, float]]:
        """Relevant documents (index, score), best first; only those in ``candidates`` if given."""
        ...


class Ranker(Protocol):
    """Builds a ``RankIndex`` over a list of documents (positions are the document ids)."""

    def index(self, documents: Sequence[str]) -> RankIndex:
        ...


class _BM25Index:
    def __init__(self, documents: Sequence[str], k1: float, b: float, delta: float):
        from rank_bm25 import BM25Plus

        tokens = [tokenize(doc) for doc in documents]
        self._postings: dict[str, set[int]] = {}
        for position, words in enumerate(tokens):
            for word in words:
                self._postings.setdefault(word, set()).add(position)
        # rank-bm25 divides by the corpus size and mean length: it cannot index nothing.
        self._bm25 = BM25Plus(tokens, k1=k1, b=b, delta=delta) if self._postings else None

    def search(self, query: str, candidates: Collection[int] | None = None) -> list[tuple[int, float]]:
        words = tokenize(query)
        matching: set[int] = set()
        for word in set(words):
            matching |= self._postings.get(word, set())
        if candidates is not None:
            matching &= set(candidates)
        if not matching or self._bm25 is None:
            return []
        ids = sorted(matching)
        scores = self._bm25.get_batch_scores(words, ids)
        return sorted(zip(ids, scores), key=lambda pair: (-pair[1], pair[0]))


class BM25Ranker:
    """Okapi-family BM25 (the BM25+ variant, whose idf stays positive in tiny memories).

    Only documents sharing at least one word with the query are returned: BM25+ gives
    every document a floor score, which would otherwise rank unrelated records.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, delta: float = 1.0):
        self.k1, self.b, self.delta = k1, b, delta

    def index(self, documents: Sequence[str]) -> RankIndex:
        return _BM25Index(documents, self.k1, self.b, self.delta)
