"""Embeddings: pooling against plain loops, corpus search against brute force, NumPy and CuPy."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cuda_emu import emulated_cupy
from hypothesis import given, settings
from hypothesis import strategies as st
from row_select_check import check_row_select

from services.postproc.embeddings import SCORE_ERROR, CorpusFullError, CorpusStore, UnknownCorpusError, pool
from services.postproc.sampling import FieldError


def cupy_or_skip() -> Any:
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request: pytest.FixtureRequest) -> Any:
    return np if request.param == "numpy" else cupy_or_skip()


def loop_pool(hidden: npt.NDArray[np.floating], mask: npt.NDArray[np.bool_], pooling: str) -> npt.NDArray[np.float64]:
    out = []
    for h, m in zip(hidden.astype(np.float64), mask, strict=True):
        idx = np.flatnonzero(m)
        out.append(h[idx].mean(axis=0) if pooling == "mean" else h[idx[-1] if pooling == "last" else idx[0]])
    return np.asarray(out)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pooling_matches_plain_loops(xp: Any, pooling: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(5, 7, 16)).astype(dtype)
    mask = rng.random((5, 7)) < 0.6
    mask[:, 3] = True  # every sequence has a token
    want = loop_pool(hidden, mask, pooling)
    np.testing.assert_allclose(pool(xp, hidden, mask, pooling, False), want, rtol=1e-5, atol=1e-5)
    unit = pool(xp, hidden, mask, pooling, True)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5, atol=1e-5)


def test_no_mask_means_every_token() -> None:
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(pool(np, hidden, None, "mean", False), hidden.mean(axis=1))
    np.testing.assert_array_equal(pool(np, hidden, None, "last", False), hidden[:, -1])


@pytest.mark.parametrize(
    ("hidden", "mask", "pooling", "field"),
    [
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), bool), "mean", "mask"),
        (np.zeros((2, 3, 4), np.float32), np.ones((2, 4), bool), "mean", "mask"),
        (np.zeros((2, 0, 4), np.float32), None, "mean", "hidden_states.shape"),
        (np.full((1, 2, 2), np.nan, np.float32), None, "cls", "hidden_states"),
        (np.zeros((1, 2, 2), np.float32), None, "max", "pooling"),
    ],
)
def test_bad_pooling_inputs_name_their_field(
    hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_] | None, pooling: str, field: str
) -> None:
    with pytest.raises(FieldError) as info:
        pool(np, hidden, mask, pooling, False)
    assert info.value.field == field


def brute_force(corpus: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float64]:
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return -np.sort(-(q.astype(np.float64) @ c.T.astype(np.float64)), axis=1)[:, :k]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 8), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_search_equals_brute_force(size: int, dim: int, queries: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(size, dim)).astype(np.float32)
    q = rng.normal(size=(queries, dim)).astype(np.float32)
    store = CorpusStore(np, 1 << 30)
    store.add("c", corpus, [f"v{i}" for i in range(size)])
    hits = store.search("c", q, k)
    want = brute_force(corpus, q, min(k, size))
    for h, w in zip(hits, want, strict=True):
        np.testing.assert_allclose(h.scores, w, rtol=1e-5, atol=1e-5)
        assert len(set(h.ids)) == len(h.ids) == min(k, size)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(2, 24), st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_a_fast_product_within_the_error_bound_gives_the_exact_results(
    size: int, dim: int, queries: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct directions: many exact ties and near-ties across the top-k cut.
    corpus = rng.normal(size=(size, dim)).astype(np.float32)
    corpus[rng.random(size) < 0.5] = corpus[0]
    q = np.vstack([corpus[:1], rng.normal(size=(queries, dim))]).astype(np.float32)

    def noisy(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        exact = a @ b
        return (exact + rng.uniform(-0.99, 0.99, exact.shape) * SCORE_ERROR).astype(np.float32)

    fast, exact = CorpusStore(np, 1 << 30, fast_scores=noisy), CorpusStore(np, 1 << 30)
    ids = [f"v{i}" for i in range(size)]
    fast.add("c", corpus, ids)
    exact.add("c", corpus, ids)
    unit = corpus.astype(np.float64) / np.linalg.norm(corpus.astype(np.float64), axis=1, keepdims=True)
    for i, (got, want) in enumerate(zip(fast.search("c", q, k), exact.search("c", q, k), strict=True)):
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
        # Rows of equal scores may stand in for each other at the cut; their true scores may not.
        true = unit[[int(id_[1:]) for id_ in got.ids]] @ (q[i] / np.linalg.norm(q[i]))
        np.testing.assert_allclose(true, brute_force(corpus, q[i : i + 1], min(k, size))[0], rtol=1e-5, atol=1e-5)
        assert len(set(got.ids)) == len(got.ids)


def test_searches_of_few_queries_take_the_exact_product() -> None:
    rng = np.random.default_rng(8)
    corpus = rng.normal(size=(500, 16)).astype(np.float32)
    calls: list[int] = []

    def fast(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        calls.append(len(a))
        return a @ b

    store = CorpusStore(np, 1 << 30, fast_scores=fast, fast_min_queries=3)
    store.add("c", corpus, [str(i) for i in range(len(corpus))])
    for n in (1, 2, 3, 5):
        q = rng.normal(size=(n, 16)).astype(np.float32)
        for h, w in zip(store.search("c", q, 4), brute_force(corpus, q, 4), strict=True):
            np.testing.assert_allclose(h.scores, w, rtol=1e-5, atol=1e-5)
    assert calls == [3, 5]


def test_queries_near_ties_at_the_cut_are_rescored_wider_before_an_exact_search() -> None:
    k, dim = 5, 8
    # Query 0 (along e0): k rows at cos 0.9, then 100 rows within SCORE_ERROR below them, so
    # the k + 64 best by the fast product leave it unsure; the rest are far below.  Query 1
    # (along e2): every row scores ~0.29 (ties up to rounding), so it stays unsure and is searched exactly.
    cosines = np.concatenate([np.full(k, 0.9), np.full(100, 0.9 - SCORE_ERROR / 4), np.linspace(0.5, -0.5, 500)])
    corpus = np.zeros((len(cosines), dim))
    corpus[:, 0], corpus[:, 1], corpus[:, 2] = cosines, np.sqrt(1 - cosines**2), 0.3
    q = np.eye(dim)[[0, 2]].astype(np.float32)
    calls: list[tuple[int, int]] = []

    def select(scores: Any, size: int, m: int) -> tuple[Any, Any]:
        calls.append((len(scores), m))
        return np.argsort(-scores[:, :size], axis=1, kind="stable")[:, :m], np.zeros(len(scores), bool)

    def exact_product(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return a @ b  # within any error bound: how far the search escalates depends on the data alone

    store, exact = CorpusStore(np, 1 << 30, fast_scores=exact_product, select_rows=select), CorpusStore(np, 1 << 30)
    ids = [f"v{i}" for i in range(len(corpus))]
    store.add("c", corpus.astype(np.float32), ids)
    exact.add("c", corpus.astype(np.float32), ids)
    got, want = store.search("c", q, k), exact.search("c", q, k)
    assert got[0].ids == want[0].ids == [f"v{i}" for i in range(k)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6)
    # Both queries k + 64; both again with k + 256 (query 0 is settled there); query 1 exactly.
    assert calls == [(2, k + 64), (2, k + 256), (1, k)]


def test_corpus_add_replace_remove_and_search(xp: Any) -> None:
    rng = np.random.default_rng(3)
    store = CorpusStore(xp, 1 << 30)
    vectors = rng.normal(size=(2000, 32)).astype(np.float32)
    ids = [f"doc{i}" for i in range(2000)]
    assert store.add("docs", vectors[:1500], ids[:1500]) == 1500
    assert store.add("docs", vectors[1000:], ids[1000:]) == 2000  # 500 replaced, 500 new
    hits = store.search("docs", vectors[[5, 1700]], 3)
    assert [h.ids[0] for h in hits] == ["doc5", "doc1700"]
    np.testing.assert_allclose([h.scores[0] for h in hits], 1.0, rtol=1e-5)
    assert store.remove("docs", ["doc5", "nope"]) == (1, 1999)
    assert "doc5" not in store.search("docs", vectors[[5]], 5)[0].ids
    want = brute_force(np.delete(vectors, 5, axis=0), vectors[[7]], 10)[0]
    np.testing.assert_allclose(store.search("docs", vectors[[7]], 10)[0].scores, want, rtol=1e-5, atol=1e-5)
    (info,) = store.info()
    assert (info.name, info.size, info.dim) == ("docs", 1999, 32) and info.bytes >= 1999 * 32 * 4
    assert store.remove("docs", []) == (1999, 0)
    with pytest.raises(UnknownCorpusError):
        store.search("docs", vectors[:1], 1)


def test_corpus_refuses_bad_vectors_and_respects_its_memory_budget() -> None:
    store = CorpusStore(np, 1024 * 8 * 4)  # room for 1024 vectors of dim 8
    with pytest.raises(FieldError, match="zero norm"):
        store.add("c", np.zeros((1, 8), np.float32), ["a"])
    with pytest.raises(FieldError) as info:
        store.add("c", np.ones((2, 8), np.float32), ["a", "a"])
    assert info.value.field == "ids"
    store.add("c", np.ones((3, 8), np.float32), ["a", "b", "c"])
    with pytest.raises(FieldError) as info:
        store.add("c", np.ones((1, 4), np.float32), ["d"])
    assert info.value.field == "vectors.shape"
    with pytest.raises(CorpusFullError):
        store.add("c", np.ones((2000, 8), np.float32), [str(i) for i in range(2000)])
    assert store.info()[0].size == 3


def test_rows_a_selector_gives_back_are_selected_by_partition() -> None:
    rng = np.random.default_rng(5)
    corpus = rng.normal(size=(2500, 16)).astype(np.float32)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    calls = []

    def select(scores: Any, size: int, m: int) -> tuple[Any, Any] | None:
        calls.append(m)
        if m > 8:
            return None  # beyond this selector
        rows = np.argsort(-scores[:, :size], axis=1, kind="stable")[:, :m]
        failed = np.arange(len(scores)) % 2 == 1
        rows[failed] = -1  # must be ignored
        return rows, failed

    store = CorpusStore(np, 1 << 30, select_rows=select)
    store.add("c", corpus, [str(i) for i in range(len(corpus))])
    for k in (5, 12):
        for h, w in zip(store.search("c", q, k), brute_force(corpus, q, k), strict=True):
            np.testing.assert_allclose(h.scores, w, rtol=1e-5, atol=1e-5)
    assert calls == [5, 12]


@pytest.mark.gpu
@pytest.mark.parametrize("size", [1, 7, 1000, 1024, 5003, 8192, 8193, 70_000, 300_000])
def test_row_select_kernel_equals_a_stable_sort(size: int) -> None:
    cupy = cupy_or_skip()
    from services.postproc.search_cuda import CupyRowSelect

    check_row_select(CupyRowSelect(cupy), size, cupy.asarray, lambda a: a.get())


@pytest.mark.emulator
@pytest.mark.parametrize("size", [7, 8193, 20_000])
def test_row_select_kernel_equals_a_stable_sort_on_the_cuda_emulator(size: int) -> None:
    from services.postproc.search_cuda import CupyRowSelect

    kernels = ("llf_row_select", "llf_chunk_select", "llf_chunk_select_wide", "llf_merge_select")
    check_row_select(CupyRowSelect(emulated_cupy(kernels)), size, np.asarray, np.asarray)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [False, True], ids=["partition", "kernel"])
@pytest.mark.parametrize("tf32", [False, True], ids=["exact", "tf32-filtered"])
def test_cupy_search_matches_numpy_on_a_large_corpus(tf32: bool, kernel: bool) -> None:
    cupy = cupy_or_skip()
    from services.postproc.backends import _tf32_matmul
    from services.postproc.search_cuda import CupyRowSelect

    fast = _tf32_matmul(cupy) if tf32 else None
    if tf32 and fast is None:
        pytest.skip("this CuPy cannot switch float32 products to TF32")
    rng = np.random.default_rng(4)
    corpus = rng.normal(size=(100_000, 128)).astype(np.float32)
    corpus[1000:1100] = corpus[7]  # exact ties at the top for the first query
    corpus[20_000:26_000] = corpus[8]  # more ties than the kernel holds for the second
    ids = [str(i) for i in range(corpus.shape[0])]
    queries = np.vstack([corpus[7:9], rng.normal(size=(16, 128))]).astype(np.float32)
    select = CupyRowSelect(cupy) if kernel else None
    got, want = CorpusStore(cupy, 1 << 32, fast_scores=fast, select_rows=select), CorpusStore(np, 1 << 32)
    got.add("c", corpus, ids)
    want.add("c", corpus, ids)
    for g, w in zip(got.search("c", queries, 10), want.search("c", queries, 10), strict=True):
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)
        if g.scores[0] < 0.999:  # distinct scores: the same rows
            assert g.ids[:3] == w.ids[:3]
