"""Embeddings: pooling of per-token hidden states, and named corpora searched by cosine top-k.

The same code runs on NumPy and on CuPy: it only takes an array module ``xp``.  Corpora
keep their vectors L2-normalised on the device (``xp``), in insertion order, so a search
is one matrix product followed by a per-query top-k: the k groups of 1024 rows with the
best maxima hold every top-k row, so only those groups are partitioned.  Given
``select_rows`` (on the GPU: :mod:`services.postproc.search_cuda`), that selection runs
there instead, and the partition only for the queries it gives back.

Given ``fast_scores`` (on the GPU: the product on TF32 tensor cores), the full product is
only a filter: every score it gives is within :data:`SCORE_ERROR` of the exact one, so the
k + 64 best rows by it are rescored exactly, and a query keeps that answer only when its
k-th exact score beats every row left out by more than the error.  The rest (near-ties
across the cut) get k + 256 rows rescored the same way, and only those still unsure are
searched exactly.  The results are the exact search's either way.
NumPy only at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from services.postproc.sampling import FieldError

__all__ = [
    "POOLINGS",
    "CorpusFullError",
    "CorpusInfo",
    "CorpusStore",
    "SearchHits",
    "SelectRows",
    "UnknownCorpusError",
    "normalize_rows",
    "pool",
]

POOLINGS = ("mean", "last", "cls")
_MIN_NORM = 1e-12
_GROUP = 1024  # rows per search group; corpus capacities are multiples of it
# |fast - exact| bound for unit vectors: TF32 rounds each input to 11 significant bits
# (relative error 2^-11, so 2^-10 per product and, by Cauchy-Schwarz, in the sum), plus the
# float32 accumulation; twice that for safety.
SCORE_ERROR = 2e-3
# Rows rescored beyond k; the later counts only for the queries the one before left unsure.
_RESCORE_EXTRA = (64, 256)

# select(scores, size, m) -> (rows [queries, m], failed [queries]) or None (can't): the m best
# of scores[:, :size] per query; rows of failed queries are ignored.
SelectRows = Callable[[Any, int, int], tuple[Any, Any] | None]


class CorpusFullError(RuntimeError):
    """The corpora would outgrow their memory budget."""


class UnknownCorpusError(LookupError):
    """No corpus has this name."""


@dataclass(frozen=True, slots=True)
class CorpusInfo:
    """What DeviceStatus reports of one corpus."""

    name: str
    size: int
    dim: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SearchHits:
    """Top-k of one query: ids and cosine scores, best first."""

    ids: list[str]
    scores: npt.NDArray[np.float32]


def normalize_rows(field_name: str, vectors: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """``vectors`` ([n, dim]) as float32 rows of unit L2 norm; refuses non-finite and zero rows."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] == 0:
        raise FieldError(f"{field_name}.shape", f"must be [n, dim] with dim >= 1, got {list(v.shape)}")
    if not np.isfinite(v).all():
        raise FieldError(field_name, "holds NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))
    zero = np.flatnonzero(norms < _MIN_NORM)
    if zero.size:
        raise FieldError(field_name, f"row {int(zero[0])} has zero norm, so it has no direction")
    return (v / norms[:, None]).astype(np.float32)


def pool(
    xp: Any,
    hidden: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    mask: npt.NDArray[np.bool_] | None,
    pooling: str,
    normalize: bool,
) -> npt.NDArray[np.float32]:
    """One float32 vector per sequence of ``hidden`` ([batch, tokens, dim]), on ``xp``.

    ``mask`` ([batch, tokens], True for real tokens; None for all real) picks the tokens:
    ``mean`` averages them, ``last`` takes the last, ``cls`` the first.  With
    ``normalize`` every vector is scaled to unit L2 norm (zero vectors stay zero).
    Returns a host (NumPy) array.
    """
    if pooling not in POOLINGS:
        raise FieldError("pooling", f"must be one of {', '.join(POOLINGS)}")
    if hidden.ndim != 3 or 0 in hidden.shape:
        raise FieldError("hidden_states.shape", f"must be [batch, tokens, dim], each >= 1, got {list(hidden.shape)}")
    batch, tokens, _ = hidden.shape
    if mask is None:
        mask = np.ones((batch, tokens), dtype=np.bool_)
    if mask.shape != (batch, tokens):
        raise FieldError("mask", f"must hold batch * tokens = {batch * tokens} entries, got {mask.size}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise FieldError("mask", f"sequence {int(empty[0])} has no unmasked token")
    if not np.isfinite(hidden).all():
        raise FieldError("hidden_states", "holds NaN or infinite values")
    h = xp.asarray(hidden).astype(xp.float32)
    m = xp.asarray(mask)
    rows = xp.arange(batch)
    if pooling == "mean":
        weights = m.astype(xp.float32)
        out = xp.matmul(weights[:, None, :], h)[:, 0, :] / weights.sum(axis=1)[:, None]
    elif pooling == "last":
        out = h[rows, tokens - 1 - xp.argmax(m[:, ::-1], axis=1)]
    else:
        out = h[rows, xp.argmax(m, axis=1)]
    if normalize:
        norms = xp.sqrt((out * out).sum(axis=1, keepdims=True))
        out = out / xp.maximum(norms, xp.float32(_MIN_NORM))
    result = _to_host(out)
    return np.ascontiguousarray(result, dtype=np.float32)


@dataclass
class _Corpus:
    vectors: Any  # xp [capacity, dim] float32, rows [:size] in use
    size: int = 0
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes)


class CorpusStore:
    """Named corpora of unit vectors on ``xp``, within ``bytes_limit`` bytes together.

    Thread-safe: every method takes the store's lock.
    """

    def __init__(
        self,
        xp: Any,
        bytes_limit: int,
        fast_scores: Callable[[Any, Any], Any] | None = None,
        select_rows: SelectRows | None = None,
        fast_min_queries: int = 1,
    ) -> None:
        self._xp = xp
        self.fast_scores = fast_scores  # a @ b within SCORE_ERROR of the exact product, faster; None: exact
        # Searches of fewer queries take the exact product: while it is bound by reading the
        # corpus, the fast one saves nothing and its rescoring costs extra.
        self.fast_min_queries = fast_min_queries
        self.select_rows = select_rows
        self.bytes_limit = bytes_limit
        self._corpora: dict[str, _Corpus] = {}
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        """Bytes the corpora's buffers take (capacity, not just the rows in use)."""
        return sum(c.nbytes for c in list(self._corpora.values()))  # a snapshot: readers take no lock

    def info(self) -> list[CorpusInfo]:
        """Every corpus, by name."""
        with self._lock:
            return [CorpusInfo(name, c.size, c.dim, c.nbytes) for name, c in sorted(self._corpora.items())]

    def _get(self, name: str) -> _Corpus:
        corpus = self._corpora.get(name)
        if corpus is None:
            raise UnknownCorpusError(f"corpus {name!r} does not exist")
        return corpus

    def add(self, name: str, vectors: npt.NDArray[np.floating[Any]], ids: Sequence[str]) -> int:
        """Add or replace ``ids`` with ``vectors`` ([n, dim]); creates the corpus. Returns its size."""
        if not name:
            raise FieldError("corpus", "must not be empty")
        unit = normalize_rows("vectors", vectors)
        if unit.shape[0] == 0:
            raise FieldError("vectors.shape", "must hold at least one vector")
        if len(ids) != unit.shape[0]:
            raise FieldError("ids", f"has {len(ids)} entries for {unit.shape[0]} vectors")
        if len(set(ids)) != len(ids):
            raise FieldError("ids", "must be distinct")
        xp = self._xp
        with self._lock:
            corpus = self._corpora.get(name)
            if corpus is not None and corpus.dim != unit.shape[1]:
                raise FieldError("vectors.shape", f"corpus {name!r} holds dim {corpus.dim}, got {unit.shape[1]}")
            size = corpus.size if corpus else 0
            index = corpus.index if corpus else {}
            rows = np.empty(len(ids), dtype=np.int64)
            new = 0
            for i, id_ in enumerate(ids):
                at = index.get(id_)
                if at is None:
                    at = size + new
                    new += 1
                rows[i] = at
            needed = size + new
            capacity = corpus.vectors.shape[0] if corpus else 0
            if needed > capacity:
                capacity = -(-max(needed, 2 * capacity) // _GROUP) * _GROUP
                grown = capacity * unit.shape[1] * 4
                if self.bytes_used - (corpus.nbytes if corpus else 0) + grown > self.bytes_limit:
                    raise CorpusFullError(
                        f"corpus {name!r} would need {grown} bytes; the corpora may use {self.bytes_limit} bytes "
                        f"and use {self.bytes_used}"
                    )
                buffer = xp.zeros((capacity, unit.shape[1]), dtype=xp.float32)  # spare rows stay finite
                if corpus is not None and size:
                    buffer[:size] = corpus.vectors[:size]
                corpus = corpus or _Corpus(buffer)
                corpus.vectors = buffer
                self._corpora[name] = corpus
            assert corpus is not None
            corpus.vectors[xp.asarray(rows)] = xp.asarray(unit)
            for id_, at in zip(ids, rows.tolist(), strict=True):
                if at >= size:
                    corpus.ids.append(id_)
                corpus.index[id_] = at
            corpus.size = needed
            return needed

    def remove(self, name: str, ids: Sequence[str]) -> tuple[int, int]:
        """Remove ``ids`` (unknown ones ignored), or the whole corpus when ``ids`` is empty.

        Returns (removed, size left).  Raises :class:`UnknownCorpusError` for an unknown corpus.
        """
        with self._lock:
            corpus = self._get(name)
            if not ids:
                del self._corpora[name]
                return corpus.size, 0
            drop = {corpus.index[i] for i in ids if i in corpus.index}
            if not drop:
                return 0, corpus.size
            keep = np.setdiff1d(np.arange(corpus.size), np.fromiter(drop, np.int64, len(drop)))
            if keep.size:
                # Compaction keeps the insertion order (search ties prefer earlier rows).
                corpus.vectors[: keep.size] = corpus.vectors[self._xp.asarray(keep)]
            corpus.ids = [corpus.ids[r] for r in keep.tolist()]
            corpus.index = {id_: r for r, id_ in enumerate(corpus.ids)}
            corpus.size = int(keep.size)
            return len(drop), corpus.size

    def search(self, name: str, queries: npt.NDArray[np.floating[Any]], top_k: int) -> list[SearchHits]:
        """Cosine top-``top_k`` of each query row against corpus ``name`` (:class:`UnknownCorpusError` if unknown)."""
        unit = normalize_rows("queries", queries)
        if top_k < 1:
            raise FieldError("top_k", f"must be >= 1, got {top_k}")
        xp = self._xp
        with self._lock:
            corpus = self._get(name)
            if unit.shape[1] != corpus.dim:
                raise FieldError("queries.shape", f"corpus {name!r} holds dim {corpus.dim}, got {unit.shape[1]}")
            k = min(top_k, corpus.size)
            if k == 0:
                return [SearchHits([], np.zeros(0, np.float32)) for _ in range(unit.shape[0])]
            groups = -(-corpus.size // _GROUP)
            q = xp.asarray(unit)
            vectors = corpus.vectors[: groups * _GROUP]
            select = self.select_rows
            if self.fast_scores is None or len(q) < self.fast_min_queries:
                cand, cand_scores = _exact_top_k(xp, q, vectors, corpus.size, k, select)
            else:
                cand, cand_scores = _rescored_top_k(xp, q, vectors, corpus.size, k, select, self.fast_scores)
            # The k survivors of each query are ordered on the host (a few dozen values; on the
            # GPU each of these small steps costs a launch): by row first, so equal scores come
            # out in insertion order, then by score.
            cand, cand_scores = _to_host(cand), _to_host(cand_scores)
            by_row = np.argsort(cand, axis=1)
            cand, cand_scores = (
                np.take_along_axis(cand, by_row, axis=1),
                np.take_along_axis(cand_scores, by_row, axis=1),
            )
            order = np.argsort(-cand_scores, axis=1, kind="stable")
            rows, values = np.take_along_axis(cand, order, axis=1), np.take_along_axis(cand_scores, order, axis=1)
            ids = corpus.ids
            return [
                SearchHits([ids[r] for r in row.tolist()], np.asarray(v, dtype=np.float32))
                for row, v in zip(rows, values, strict=True)
            ]


def _best_rows(xp: Any, scores: Any, size: int, m: int, select: SelectRows | None) -> Any:
    """The ``m`` highest-scoring rows of each query (in no order), from ``scores`` [queries,
    groups * _GROUP], by ``select`` where it can, else by partitioning the best groups."""
    picked = select(scores, size, m) if select is not None else None
    if picked is None:
        return _partitioned_best_rows(xp, scores, size, m)
    rows, failed = picked
    redo = xp.nonzero(failed)[0]
    if len(redo):
        rows[redo] = _partitioned_best_rows(xp, scores[redo], size, m)
    return rows


def _partitioned_best_rows(xp: Any, scores: Any, size: int, m: int) -> Any:
    """:func:`_best_rows` by partitions; overwrites the columns of ``scores`` past ``size`` with -inf."""
    n_q, groups = scores.shape[0], scores.shape[1] // _GROUP
    scores[:, size:] = -xp.inf  # unused rows of the last group
    best_groups = _top_k(xp, scores.reshape(n_q, groups, _GROUP).max(axis=2), min(m, groups))
    rows_in = (best_groups[:, :, None] * _GROUP + xp.arange(_GROUP)).reshape(n_q, -1)
    return xp.take_along_axis(rows_in, _top_k(xp, xp.take_along_axis(scores, rows_in, axis=1), m), axis=1)


def _exact_top_k(xp: Any, q: Any, vectors: Any, size: int, k: int, select: SelectRows | None) -> tuple[Any, Any]:
    """Rows and scores of each query's top ``k`` (in no order), from one exact product."""
    scores = xp.matmul(q, vectors.T)
    rows = _best_rows(xp, scores, size, k, select)
    return rows, xp.take_along_axis(scores, rows, axis=1)


def _rescored_top_k(
    xp: Any,
    q: Any,
    vectors: Any,
    size: int,
    k: int,
    select: SelectRows | None,
    fast_scores: Callable[[Any, Any], Any],
) -> tuple[Any, Any]:
    """What :func:`_exact_top_k` returns, with the full product computed by ``fast_scores``
    and only the best rows by it rescored exactly (see the module docstring)."""
    approx = fast_scores(q, vectors.T)
    cand, cand_scores, unsure = _rescore(xp, q, approx, vectors, size, k, k + _RESCORE_EXTRA[0], select)
    # A query left unsure has its near-ties close to the cut: rescoring more of its rows by
    # the same fast product usually settles it, for much less than an exact product.
    for extra in _RESCORE_EXTRA[1:]:
        if not len(unsure):
            return cand, cand_scores
        rows, scores, still = _rescore(xp, q[unsure], approx[unsure], vectors, size, k, k + extra, select)
        cand[unsure], cand_scores[unsure] = rows, scores
        unsure = unsure[still]
    if len(unsure):
        cand[unsure], cand_scores[unsure] = _exact_top_k(xp, q[unsure], vectors, size, k, select)
    return cand, cand_scores


def _rescore(
    xp: Any, q: Any, approx: Any, vectors: Any, size: int, k: int, m: int, select: SelectRows | None
) -> tuple[Any, Any, Any]:
    """Each query's top ``k`` among its ``m`` best rows by the fast scores ``approx``, rescored
    exactly, and the indices of the queries whose answer may differ from the exact search's."""
    m = min(m, size)
    rows = _best_rows(xp, approx, size, m, select)
    # Every row left out scores (fast) at most the lowest fast score kept.
    left_out = (
        xp.take_along_axis(approx, rows, axis=1).min(axis=1) if m < size else xp.full(len(q), -xp.inf, xp.float32)
    )
    exact = xp.matmul(vectors[rows], q[:, :, None])[:, :, 0]
    pick = _top_k(xp, exact, k)
    cand, cand_scores = xp.take_along_axis(rows, pick, axis=1), xp.take_along_axis(exact, pick, axis=1)
    return cand, cand_scores, xp.nonzero(cand_scores.min(axis=1) <= left_out + SCORE_ERROR)[0]


def _top_k(xp: Any, values: Any, k: int) -> Any:
    """Column indices of the ``k`` largest values of each row, in no particular order."""
    if k >= values.shape[1]:
        return xp.broadcast_to(xp.arange(values.shape[1]), values.shape)
    return xp.argpartition(-values, k - 1, axis=1)[:, :k]


def _to_host(a: Any) -> np.ndarray:
    """A CuPy array copied to the host; a NumPy array as it is."""
    return a.get() if hasattr(a, "get") else a
