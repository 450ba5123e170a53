"""Token sampling from full-vocabulary logits: validation, the batch layout and the NumPy reference.

NumPy only (like :mod:`services.postproc.token_stats`): the CuPy kernels in
:mod:`services.postproc.sampling_cuda` implement the same definitions, and both backends
return the same token for the same seed (see "Agreement" below).

Per row, in this order:

1. **Penalties** (llama.cpp semantics) over the distinct tokens ``t`` of the row's history,
   with ``c`` occurrences: ``l = l / rep if l > 0 else l * rep``, then
   ``l = l - (c * frequency + presence)``, in float32, stored back in the input dtype.
2. **Validation**: a row holding NaN or ±inf after the penalties is refused.
3. **Weights**: ``m = max(l)``, ``d = (l - m) * inv_t`` with ``inv_t = float32(1 / T)``
   (``inv_t = 1`` when greedy) and ``w = exp_ref(d)`` in ``(0, 1]`` (``w = 1`` at the
   maximum; 0 below ``2**-125``).  :func:`exp_ref` uses only correctly rounded float32
   additions and multiplications, so every backend computes the same bits.
4. **Greedy** (``T < 1e-5`` or ``top_k == 1``): the first token of maximal logit.
5. **Filters**, each an upper set (ties all kept): top-k keeps ``l >= the k-th largest
   logit`` (the set ``K``); top-p, over ``K`` renormalised, keeps a token of ``K`` when
   the mass strictly above it is below ``top_p * Z_K``; min-p keeps ``w >= min_p``.
   The kept set is their intersection.
6. **Sampling** without sorting, by rejection (as FlashInfer does): draw ``j`` by inverse
   CDF (vocabulary order, cumulative weights) from ``B = K ∩ {w >= min_p}``; while the
   mass of ``K ∩ {w > w_j}`` is at least ``top_p * Z_K``, draw again from
   ``K ∩ {w > w_j}``.  This samples exactly the filtered distribution: every rejected
   token lies outside the kept set, which is contained in every set drawn from.  Draw
   ``r`` uses ``u_r = splitmix64(seed + (r + 1) * 0x9E3779B97F4A7C15) >> 11`` scaled to
   ``[0, 1)``.
7. **Logprobs** of the chosen and the ``top_logprobs`` most likely tokens (largest
   logits, ties by lower id): ``d - log(sum(exp(d)))``, the log-softmax over the whole
   vocabulary before the filters.

Agreement: logits, weights and thresholds are bit-identical across backends; only sums
differ in order and precision (float32 per GPU thread, float64 here), so a backend picks
another token only when a uniform lands within about 1e-6 (relative) of a cumulative
boundary.  Logprobs agree to 1e-5.  The GPU runs flush-to-zero, so subnormal logits
count as 0 here as well, and -0 counts as +0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

__all__ = [
    "GREEDY_TEMPERATURE",
    "FieldError",
    "RowParams",
    "SampleBatch",
    "SampleLimits",
    "SampleResult",
    "concat_sample_batches",
    "exp_ref",
    "make_sample_batch",
    "sample_numpy",
    "split_result",
    "splitmix_uniform",
]

# Below this temperature a row is sampled greedily (1 / T would overflow float32 near 3e-39).
GREEDY_TEMPERATURE = 1e-5
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_F32_TINY = np.float32(np.finfo(np.float32).tiny)
_LOG2E = np.float32(1.4426950408889634)
# Taylor coefficients of 2**f on [-0.5, 0.5] (relative error about 1e-7), highest degree first.
EXP2_COEFFS = tuple(np.float32(math.log(2.0) ** n / math.factorial(n)) for n in range(6, -1, -1))
# exp_ref(d) is 0 when d * log2(e) < this, so 2**k stays a normal float32 and results are never subnormal.
EXP2_MIN = np.float32(-125.0)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]


class FieldError(ValueError):
    """A request field is invalid; ``field`` names it (e.g. ``rows[3].top_p``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class SampleLimits:
    """What one batch may hold."""

    max_vocab: int = 262_144
    max_rows: int = 256
    max_history: int = 4096
    max_top_logprobs: int = 20


@dataclass(frozen=True, slots=True)
class RowParams:
    """Sampling parameters of one row (see the module docstring for their meaning)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    history: Sequence[int] = ()
    seed: int = 0
    top_logprobs: int = 0


@dataclass(frozen=True, slots=True)
class SampleBatch:
    """Validated rows in the layout both backends read: per-row parameter arrays plus
    the penalties as distinct ``(row, token, count)`` entries sorted by row."""

    logits: npt.NDArray[np.float32] | npt.NDArray[np.float16]  # [rows, vocab], C-contiguous
    inv_temperature: FloatArray  # 0 marks a greedy row
    top_k: IntArray  # 0 = off
    top_p: FloatArray
    min_p: FloatArray
    repetition_penalty: FloatArray
    presence_penalty: FloatArray
    frequency_penalty: FloatArray
    seed: npt.NDArray[np.uint64]
    top_logprobs: IntArray
    penalty_rows: IntArray
    penalty_tokens: IntArray
    penalty_counts: IntArray

    @property
    def n_rows(self) -> int:
        """Rows in the batch."""
        return int(self.logits.shape[0])

    @property
    def vocab(self) -> int:
        """Logits per row."""
        return int(self.logits.shape[1])

    @property
    def max_top_logprobs(self) -> int:
        """Widest top-logprobs request in the batch."""
        return int(self.top_logprobs.max(initial=0))


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One token per row; rows whose logits held NaN/inf have ``invalid`` set and token -1."""

    token: IntArray
    logprob: FloatArray
    top_tokens: IntArray  # [rows, max_top_logprobs], -1 past each row's top_logprobs
    top_logprobs: FloatArray
    invalid: npt.NDArray[np.bool_]
    backend: str


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise FieldError(field, f"must be finite, got {value}")
    return value


def _flush(value: float) -> np.float32:
    # The GPU flushes float32 subnormals to zero; parameters get the same treatment up front.
    v = np.float32(value)
    return np.float32(0) if abs(v) < _F32_TINY else v


def make_sample_batch(
    logits: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    rows: Sequence[RowParams],
    limits: SampleLimits | None = None,
) -> SampleBatch:
    """Validate ``logits`` ([rows, vocab] float32/float16) with one :class:`RowParams` per row.

    Raises :class:`FieldError` naming the offending field.  NaN/inf logits are not
    checked here: the backends flag such rows (the GPU does it while reading them).
    """
    limits = limits or SampleLimits()
    if logits.dtype not in (np.float32, np.float16):
        raise FieldError("logits.dtype", f"must be float32 or float16, got {logits.dtype}")
    if logits.ndim != 2:
        raise FieldError("logits.shape", f"must be [rows, vocab], got {list(logits.shape)}")
    n_rows, vocab = logits.shape
    if n_rows == 0 or vocab == 0:
        raise FieldError("logits.shape", f"rows and vocab must be at least 1, got {list(logits.shape)}")
    if vocab > limits.max_vocab:
        raise FieldError("logits.shape", f"vocab {vocab} is over the limit of {limits.max_vocab}")
    if n_rows > limits.max_rows:
        raise FieldError("logits.shape", f"{n_rows} rows are over the limit of {limits.max_rows}")
    if len(rows) != n_rows:
        raise FieldError("rows", f"has {len(rows)} entries for {n_rows} rows of logits")

    inv_t = np.zeros(n_rows, np.float32)
    cols: dict[str, list[float]] = {k: [] for k in ("top_p", "min_p", "rep", "pres", "freq")}
    top_k = np.zeros(n_rows, np.int32)
    top_n = np.zeros(n_rows, np.int32)
    seeds = np.zeros(n_rows, np.uint64)
    pen_rows: list[npt.NDArray[np.int64]] = []
    pen_tokens: list[npt.NDArray[np.int64]] = []
    pen_counts: list[npt.NDArray[np.int64]] = []
    for i, p in enumerate(rows):
        f = f"rows[{i}]"
        t = _finite(f"{f}.temperature", p.temperature)
        if t < 0:
            raise FieldError(f"{f}.temperature", f"must be >= 0, got {t}")
        if p.top_k < 0:
            raise FieldError(f"{f}.top_k", f"must be >= 0, got {p.top_k}")
        if not 0 < _finite(f"{f}.top_p", p.top_p) <= 1:
            raise FieldError(f"{f}.top_p", f"must be in (0, 1], got {p.top_p}")
        if not 0 <= _finite(f"{f}.min_p", p.min_p) <= 1:
            raise FieldError(f"{f}.min_p", f"must be in [0, 1], got {p.min_p}")
        if not _finite(f"{f}.repetition_penalty", p.repetition_penalty) > 0:
            raise FieldError(f"{f}.repetition_penalty", f"must be > 0, got {p.repetition_penalty}")
        _finite(f"{f}.presence_penalty", p.presence_penalty)
        _finite(f"{f}.frequency_penalty", p.frequency_penalty)
        if not 0 <= p.top_logprobs <= limits.max_top_logprobs:
            raise FieldError(f"{f}.top_logprobs", f"must be in [0, {limits.max_top_logprobs}], got {p.top_logprobs}")
        if not 0 <= p.seed <= _MASK64:
            raise FieldError(f"{f}.seed", "must be a 64-bit unsigned integer")
        if len(p.history) > limits.max_history:
            raise FieldError(f"{f}.history", f"has {len(p.history)} tokens; the limit is {limits.max_history}")
        greedy = t < GREEDY_TEMPERATURE or p.top_k == 1
        inv_t[i] = 0 if greedy else np.float32(1.0 / t)
        top_k[i] = 0 if p.top_k >= vocab else p.top_k
        top_n[i] = p.top_logprobs
        seeds[i] = p.seed
        # Not flushed to 0: top_p 0 would keep no token, and the draws would never end.
        cols["top_p"].append(max(np.float32(p.top_p), _F32_TINY))
        cols["min_p"].append(_flush(p.min_p))
        cols["rep"].append(_flush(p.repetition_penalty))
        cols["pres"].append(_flush(p.presence_penalty))
        cols["freq"].append(_flush(p.frequency_penalty))
        penalised = p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
        if penalised and len(p.history):
            history = np.asarray(p.history, dtype=np.int64)
            if history.min() < 0 or history.max() >= vocab:
                raise FieldError(f"{f}.history", f"tokens must be in [0, {vocab})")
            tokens, counts = np.unique(history, return_counts=True)
            pen_rows.append(np.full(tokens.shape, i, np.int64))
            pen_tokens.append(tokens)
            pen_counts.append(counts)

    def cat(parts: list[npt.NDArray[np.int64]]) -> IntArray:
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    return SampleBatch(
        logits=np.ascontiguousarray(logits),
        inv_temperature=inv_t,
        top_k=top_k,
        top_p=np.asarray(cols["top_p"], np.float32),
        min_p=np.asarray(cols["min_p"], np.float32),
        repetition_penalty=np.asarray(cols["rep"], np.float32),
        presence_penalty=np.asarray(cols["pres"], np.float32),
        frequency_penalty=np.asarray(cols["freq"], np.float32),
        seed=seeds,
        top_logprobs=top_n,
        penalty_rows=cat(pen_rows),
        penalty_tokens=cat(pen_tokens),
        penalty_counts=cat(pen_counts),
    )


def concat_sample_batches(
    batches: Sequence[SampleBatch], logits: npt.NDArray[np.float32] | npt.NDArray[np.float16] | None = None
) -> SampleBatch:
    """One batch holding the rows of ``batches`` in order (all of one vocabulary size and dtype).

    ``logits``, when given, becomes the merged batch's ``[rows, vocab]`` logits as it is: the
    caller copies each batch's rows into it (the CuPy backend stages them straight into pinned
    memory, one copy instead of a concatenation and a copy).
    """
    if len(batches) == 1:
        return batches[0] if logits is None else replace(batches[0], logits=logits)
    starts = np.cumsum([0] + [b.n_rows for b in batches[:-1]])
    return SampleBatch(
        logits=np.concatenate([b.logits for b in batches]) if logits is None else logits,
        inv_temperature=np.concatenate([b.inv_temperature for b in batches]),
        top_k=np.concatenate([b.top_k for b in batches]),
        top_p=np.concatenate([b.top_p for b in batches]),
        min_p=np.concatenate([b.min_p for b in batches]),
        repetition_penalty=np.concatenate([b.repetition_penalty for b in batches]),
        presence_penalty=np.concatenate([b.presence_penalty for b in batches]),
        frequency_penalty=np.concatenate([b.frequency_penalty for b in batches]),
        seed=np.concatenate([b.seed for b in batches]),
        top_logprobs=np.concatenate([b.top_logprobs for b in batches]),
        penalty_rows=np.concatenate([b.penalty_rows + np.int32(s) for b, s in zip(batches, starts, strict=True)]),
        penalty_tokens=np.concatenate([b.penalty_tokens for b in batches]),
        penalty_counts=np.concatenate([b.penalty_counts for b in batches]),
    )


def split_result(result: SampleResult, sizes: Sequence[int], widths: Sequence[int]) -> list[SampleResult]:
    """``result`` cut into consecutive parts of ``sizes`` rows, each ``widths`` top-logprobs wide."""
    parts = []
    start = 0
    for size, width in zip(sizes, widths, strict=True):
        rows = slice(start, start + size)
        parts.append(
            SampleResult(
                token=result.token[rows],
                logprob=result.logprob[rows],
                top_tokens=result.top_tokens[rows, :width],
                top_logprobs=result.top_logprobs[rows, :width],
                invalid=result.invalid[rows],
                backend=result.backend,
            )
        )
        start += size
    return parts


def splitmix_uniform(seed: int, draw: int) -> float:
    """The ``draw``-th uniform in [0, 1) of a row with ``seed`` (splitmix64 finaliser, 53 bits)."""
    z = (seed + (draw + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return float(z >> 11) * 2.0**-53


def exp_ref(d: FloatArray) -> FloatArray:
    """``exp(d)`` for ``d <= 0`` from correctly rounded float32 operations only (module docstring, step 3)."""
    t = d * _LOG2E
    under = ~(t >= EXP2_MIN)
    t[under] = 0  # their result is 0; keep the polynomial finite
    k = np.rint(t)
    f = t
    f -= k
    # In place, one rounding per operation, as __fmul_rn then __fadd_rn on the GPU.
    w = np.full_like(f, EXP2_COEFFS[0])
    for c in EXP2_COEFFS[1:]:
        w *= f
        w += c
    scale = k.astype(np.int32)
    scale += 127
    scale <<= 23
    w *= scale.view(np.float32)
    w[under] = 0
    return w


def penalised_logits(batch: SampleBatch, rows: slice = slice(None)) -> FloatArray:
    """The logits of ``rows`` after the penalties (module docstring, step 1), as float32 with
    subnormals flushed."""
    start, stop, _ = rows.indices(batch.n_rows)
    x = batch.logits[start:stop].astype(np.float32)
    # penalty_rows is sorted: the entries of these rows are one run.
    first, last = np.searchsorted(batch.penalty_rows, (start, stop))
    if last > first:
        r, t = batch.penalty_rows[first:last], batch.penalty_tokens[first:last]
        v = x[r - start, t]
        rep = batch.repetition_penalty[r]
        v = np.where(v > 0, v / rep, v * rep)
        v = v - (
            batch.penalty_counts[first:last].astype(np.float32) * batch.frequency_penalty[r] + batch.presence_penalty[r]
        )
        x[r - start, t] = v.astype(batch.logits.dtype).astype(np.float32)
    # Subnormals and -0 (exponent bits all 0) become +0, so the GPU's integer keys order like the floats.
    x[(x.view(np.uint32) & np.uint32(0x7F800000)) == 0] = 0
    return x


def _draw(w: FloatArray, keep: npt.NDArray[np.bool_], target: float) -> int:
    """First kept index whose cumulative weight exceeds ``target`` (the last positive one if rounding overshoots)."""
    cum = np.cumsum(np.where(keep, w, np.float32(0)), dtype=np.float64)
    j = int(np.searchsorted(cum, target, side="right"))
    if j >= w.size:
        j = int(np.flatnonzero(keep & (w > 0))[-1])
    return j


_GROUP = 256


def _candidates(x: FloatArray, k: int) -> IntArray:
    """Ascending indices of ``x`` that hold every value at or above its ``k``-th largest.

    The k-th largest of the maxima of disjoint 256-value groups leaves at least ``k`` values
    at or above it, so one pass over group maxima replaces a partition of the whole row.
    Group ``j`` holds every ``groups``-th value from ``j`` on: its maxima are one vectorised
    maximum over 256 contiguous slices, not 512 short reductions (42 -> 19 us at 131072).
    """
    groups = x.size // _GROUP
    if groups < 2 * k:
        return np.arange(x.size)
    maxima = x[: groups * _GROUP].reshape(_GROUP, groups).max(axis=0)
    return np.flatnonzero(x >= np.partition(maxima, groups - k)[groups - k])


def _top_k_set(x: FloatArray, top_k: int) -> IntArray:
    """Ascending indices of the top-k set: every logit at or above the ``top_k``-th largest."""
    cand = _candidates(x, top_k)
    xc = x[cand]
    return cand[xc >= np.partition(xc, xc.size - top_k)[xc.size - top_k]]


def _sample_row(x: FloatArray, d: FloatArray, top_k: int, top_p: float, min_p: np.float32, seed: int) -> int:
    # With top-k, only its members have weight: the draws run on them alone, in vocabulary
    # order, and every sum and cumulative sum is the one over the whole row (the others add 0).
    members = _top_k_set(x, top_k) if top_k else np.arange(x.size)
    w = exp_ref(d[members])
    keep = w >= min_p
    z = float(w[keep].sum(dtype=np.float64))
    if top_p >= 1:
        return int(members[_draw(w, keep, splitmix_uniform(seed, 0) * z)])
    limit = float(top_p) * float(w.sum(dtype=np.float64))
    draw = 0
    while True:
        j = _draw(w, keep, splitmix_uniform(seed, draw) * z)
        keep = w > w[j]
        z = float(w[keep].sum(dtype=np.float64))
        if z < limit:
            return int(members[j])
        draw += 1


def top_tokens(x: FloatArray, n: int) -> IntArray:
    """The indices of the ``n`` largest values of ``x``, largest first, ties by lower index."""
    n = min(n, x.size)
    if n == 0:
        return np.zeros(0, np.int32)
    cand = _candidates(x, n)
    xc = x[cand]
    tau = np.partition(xc, xc.size - n)[xc.size - n]
    # Every index above the n-th value, then the lowest-index ties at it.
    above = cand[xc > tau]
    equal = cand[xc == tau][: n - above.size]
    idx = np.concatenate([above, equal])
    return idx[np.lexsort((idx, -x[idx]))].astype(np.int32)


# Rows of logits handled at a time by sample_numpy: a block's float32 copy and temporaries stay
# in cache.  The whole batch at once (64 x 131072) spent 205 of its 478 us a row there.
_BLOCK_BYTES = 1 << 20


def sample_numpy(batch: SampleBatch) -> SampleResult:
    """Sample one token per row on the CPU (the reference for the CuPy kernels)."""
    n_rows, width = batch.n_rows, batch.max_top_logprobs
    token = np.full(n_rows, -1, np.int32)
    logprob = np.zeros(n_rows, np.float32)
    top_ids = np.full((n_rows, width), -1, np.int32)
    top_lp = np.zeros((n_rows, width), np.float32)
    invalid = np.zeros(n_rows, np.bool_)
    block = max(1, _BLOCK_BYTES // (4 * batch.vocab))
    for start in range(0, n_rows, block):
        x = penalised_logits(batch, slice(start, start + block))
        invalid[start : start + len(x)] = ~np.isfinite(x).all(axis=1)
        for r in range(start, start + len(x)):
            if invalid[r]:
                continue
            row = x[r - start]
            m = row.max()
            inv_t = batch.inv_temperature[r]
            d = (row - m) * (inv_t if inv_t else np.float32(1))
            log_z = math.log(float(np.exp(d).sum(dtype=np.float64)))
            if inv_t == 0:
                j = int(np.argmax(row))
            else:
                j = _sample_row(row, d, int(batch.top_k[r]), float(batch.top_p[r]), batch.min_p[r], int(batch.seed[r]))
            token[r] = j
            logprob[r] = float(d[j]) - log_z
            ids = top_tokens(row, int(batch.top_logprobs[r]))
            top_ids[r, : ids.size] = ids
            top_lp[r, : ids.size] = d[ids].astype(np.float64) - log_z
    return SampleResult(token, logprob, top_ids, top_lp, invalid, backend="numpy")
