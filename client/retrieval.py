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

    def search(
        self, query: str, candidates: Collection[int] | None = None, limit: int | None = None
    ) -> list[tuple[int, float]]:
        """Up to ``limit`` relevant documents (index, score), best first; only ``candidates`` if given."""
        ...


class Ranker(Protocol):
    """Builds a ``RankIndex`` over a list of documents (positions are the document ids)."""

    def index(self, documents: Sequence[str]) -> RankIndex: ...


class _BM25Index:
    """BM25+ statistics fitted by ``rank_bm25``; scores computed over postings with numpy.

    The score equals ``BM25Plus.get_batch_scores`` (tests check it), but touches only the
    documents that contain a query word instead of looping over every document per word.
    """

    def __init__(self, tokens: Sequence[list[str]], k1: float, b: float, delta: float):
        import numpy as np
        from rank_bm25 import BM25Plus

        self._k1, self._delta = k1, delta
        self._size = len(tokens)
        # rank-bm25 divides by the corpus size and mean length: it cannot index nothing.
        self._bm25 = BM25Plus(tokens, k1=k1, b=b, delta=delta) if any(tokens) else None
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self._bm25 is None:
            return
        lists: dict[str, tuple[list[int], list[int]]] = {}
        for position, freqs in enumerate(self._bm25.doc_freqs):
            for word, tf in freqs.items():
                docs, tfs = lists.setdefault(word, ([], []))
                docs.append(position)
                tfs.append(tf)
        self._postings = {
            w: (np.array(d, dtype=np.int64), np.array(t, dtype=np.float64)) for w, (d, t) in lists.items()
        }
        doc_len = np.array(self._bm25.doc_len, dtype=np.float64)
        self._norm = k1 * (1 - b + b * doc_len / self._bm25.avgdl)

    def search(
        self, query: str, candidates: Collection[int] | None = None, limit: int | None = None
    ) -> list[tuple[int, float]]:
        import numpy as np

        if self._bm25 is None:
            return []
        words = tokenize(query)
        scores = np.zeros(self._size)
        matched = np.zeros(self._size, dtype=bool)
        floor = 0.0
        for word in words:  # repeated query words count again, as in rank_bm25
            idf = self._bm25.idf.get(word, 0.0)
            floor += idf * self._delta
            if word in self._postings:
                docs, tf = self._postings[word]
                scores[docs] += idf * (tf * (self._k1 + 1)) / (self._norm[docs] + tf)
                matched[docs] = True
        if candidates is not None:
            allowed = np.zeros(self._size, dtype=bool)
            allowed[np.fromiter(candidates, dtype=np.int64)] = True
            matched &= allowed
        ids = np.flatnonzero(matched)
        if limit is not None and limit < len(ids):
            # Keep every document tied with the limit-th score, so ties still break by position.
            cutoff = np.partition(scores[ids], len(ids) - limit)[len(ids) - limit]
            ids = ids[scores[ids] >= cutoff]
        order = np.lexsort((ids, -scores[ids]))[:limit]
        return [(int(ids[i]), float(scores[ids[i]] + floor)) for i in order]


class BM25Ranker:
    """Okapi-family BM25 (the BM25+ variant, whose idf stays positive in tiny memories).

    Only documents sharing at least one word with the query are returned: BM25+ gives
    every document a floor score, which would otherwise rank unrelated records.
    Tokenized documents are remembered between calls, so re-indexing after one new
    record does not re-tokenize the others.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, delta: float = 1.0):
        self.k1, self.b, self.delta = k1, b, delta
        self._tokens: dict[str, list[str]] = {}

    def index(self, documents: Sequence[str]) -> RankIndex:
        known = self._tokens
        self._tokens = {doc: known[doc] if doc in known else tokenize(doc) for doc in documents}
        return _BM25Index([self._tokens[doc] for doc in documents], self.k1, self.b, self.delta)
