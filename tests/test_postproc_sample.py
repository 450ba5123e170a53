"""Sampling: the NumPy reference against plain definitions, and CuPy against NumPy on a GPU."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from cuda_emu import EmuStream, emulated_cupy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.postproc.sampling import (
    FieldError,
    RowParams,
    SampleBatch,
    SampleLimits,
    SampleResult,
    concat_sample_batches,
    exp_ref,
    make_sample_batch,
    penalised_logits,
    sample_numpy,
    splitmix_uniform,
)
from services.postproc.sampling_cuda import CLUSTER_SIZES, FAST_MAX_K, CupySampler, fast_rows

# ---- plain references (float64, sort-based) ------------------------------------------------


def filtered_distribution(logits: npt.NDArray[np.floating], p: RowParams) -> npt.NDArray[np.float64]:
    """What a sort-based sampler (vLLM/HF order: temperature, top-k, top-p renormalised, min-p) draws from."""
    x = logits.astype(np.float64) / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.ones(probs.size, dtype=bool)
    if p.top_k:
        keep &= probs >= np.sort(probs)[::-1][p.top_k - 1]
    kept = np.where(keep, probs, 0) / probs[keep].sum()
    above = np.array([kept[kept > q].sum() for q in kept])
    keep &= above < p.top_p
    keep &= probs >= p.min_p * probs.max()
    out = np.where(keep, probs, 0)
    return out / out.sum()


def chi_square_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def sample_many(sample: object, logits: npt.NDArray[np.float32], params: RowParams, n: int) -> npt.NDArray[np.int32]:
    """``n`` draws with seeds 0..n-1, as one batch (every row the same logits)."""
    rows = [replace(params, seed=s) for s in range(n)]
    batch = make_sample_batch(np.repeat(logits[None, :], n, axis=0), rows, SampleLimits(max_rows=n))
    return sample(batch).token  # type: ignore[operator]


CHI_CASES = [
    RowParams(temperature=1.0),
    RowParams(temperature=0.7, top_k=5),
    RowParams(temperature=1.3, top_p=0.8),
    RowParams(min_p=0.08),
    RowParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.02),
]
CHI_LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.8, 0.3, 0.1, -0.2, -0.6, -1.0, -1.7, -2.5], dtype=np.float32)


def assert_matches_distribution(tokens: npt.NDArray[np.int32], want: npt.NDArray[np.float64]) -> None:
    counts = np.bincount(tokens, minlength=want.size)
    assert counts[want == 0].sum() == 0, "sampled a filtered token"
    support = want > 0
    expected = want[support] * tokens.size
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    if dof:
        assert stat < chi_square_critical(dof), (stat, counts, expected)


@pytest.mark.parametrize("params", CHI_CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_numpy_draws_follow_the_filtered_softmax(params: RowParams) -> None:
    tokens = sample_many(sample_numpy, CHI_LOGITS, params, 4000)
    assert_matches_distribution(tokens, filtered_distribution(CHI_LOGITS, params))


# ---- definitions --------------------------------------------------------------------------


def test_exp_ref_is_exp_to_a_few_ulp_and_exact_at_zero() -> None:
    d = np.linspace(-86, 0, 200_001, dtype=np.float32)
    w = exp_ref(d)
    np.testing.assert_allclose(w, np.exp(d.astype(np.float64)), rtol=5e-6)
    assert w[-1] == 1.0 and np.all(np.diff(w) >= 0)
    assert exp_ref(np.array([-90.0, -1e30], np.float32)).tolist() == [0.0, 0.0]


def test_uniforms_are_deterministic_and_in_range() -> None:
    draws = [splitmix_uniform(seed, d) for seed in (0, 1, 2**64 - 1) for d in range(50)]
    assert all(0 <= u < 1 for u in draws)
    assert len(set(draws)) == len(draws)
    assert splitmix_uniform(42, 3) == splitmix_uniform(42, 3)
    assert abs(np.mean([splitmix_uniform(7, d) for d in range(20_000)]) - 0.5) < 0.01


logit_rows = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.integers(1, 200)), elements=st.floats(-30, 30, width=32)
)


def test_a_subnormal_top_p_keeps_the_most_likely_token() -> None:
    logits = np.array([[0.5, 3.0, 1.0, 2.9]], np.float32)
    assert sample_numpy(make_sample_batch(logits, [RowParams(top_p=1e-40, seed=9)])).token.tolist() == [1]


@settings(max_examples=80, deadline=None)
@given(logit_rows, st.booleans())
def test_top_k_1_and_temperature_0_are_argmax(logits: npt.NDArray[np.float32], half: bool) -> None:
    logits = logits.astype(np.float16) if half else logits
    for params in (RowParams(top_k=1, seed=3), RowParams(temperature=0.0, top_p=0.3)):
        batch = make_sample_batch(logits, [params] * logits.shape[0])
        # The argmax of the logits as defined: subnormals count as 0 (the GPU flushes them).
        want = np.argmax(penalised_logits(batch), axis=1)
        np.testing.assert_array_equal(sample_numpy(batch).token, want)


def test_greedy_takes_the_first_of_tied_maxima() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 3.0]], np.float32)
    assert sample_numpy(make_sample_batch(logits, [RowParams(temperature=0)])).token.tolist() == [1]


def test_logprobs_are_the_log_softmax_over_temperature() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(3, 500)).astype(np.float32)
    params = [RowParams(temperature=0.5, seed=1, top_logprobs=5), RowParams(seed=2, top_logprobs=20), RowParams()]
    result = sample_numpy(make_sample_batch(logits, params))
    for r, p in enumerate(params):
        x = logits[r].astype(np.float64) / p.temperature
        logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        assert result.logprob[r] == pytest.approx(logp[result.token[r]], abs=2e-5)
        order = np.argsort(-logp, kind="stable")[: p.top_logprobs]
        np.testing.assert_array_equal(result.top_tokens[r, : p.top_logprobs], order)
        np.testing.assert_allclose(result.top_logprobs[r, : p.top_logprobs], logp[order], atol=2e-5)
        assert (result.top_tokens[r, p.top_logprobs :] == -1).all()


def test_penalties_follow_llama_cpp() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0, 0.0]], np.float32)
    p = RowParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5, history=[0, 1, 1, 3, 3, 3])
    got = penalised_logits(make_sample_batch(logits, [p]))[0]
    want = [2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 1.0 - 0.25, 0.5, 3.0 / 2 - 1.5 - 0.25, 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Greedy picks token 2 once the penalties pushed 0 and 3 below it.
    assert sample_numpy(make_sample_batch(logits, [replace(p, temperature=0)])).token[0] == 2


def test_same_seed_same_token_whatever_the_batch() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2, size=(4, 300)).astype(np.float32)
    rows = [RowParams(top_k=40, top_p=0.9, seed=s) for s in (11, 12, 13, 14)]
    together = sample_numpy(make_sample_batch(logits, rows)).token
    alone = [sample_numpy(make_sample_batch(logits[i : i + 1], [rows[i]])).token[0] for i in range(4)]
    assert together.tolist() == alone
    merged = concat_sample_batches([make_sample_batch(logits[2:], rows[2:]), make_sample_batch(logits[:2], rows[:2])])
    assert sample_numpy(merged).token.tolist() == [*alone[2:], *alone[:2]]


def test_a_batch_over_several_row_blocks_matches_each_row_alone() -> None:
    # 100k logits a row: sample_numpy takes two rows at a time, so the penalties of rows 1-4
    # and the NaN of row 3 fall in different blocks.
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=2, size=(5, 100_000)).astype(np.float32)
    logits[3, 7] = np.nan
    rows = [
        RowParams(top_k=40, top_p=0.9, seed=s, repetition_penalty=1.3, presence_penalty=0.5, top_logprobs=4, history=h)
        for s, h in zip(range(5), ([], [1, 2, 2], [5], [9, 9, 9], np.argsort(-logits[4])[:3].tolist()), strict=True)
    ]
    together = sample_numpy(make_sample_batch(logits, rows))
    for i in range(5):
        alone = sample_numpy(make_sample_batch(logits[i : i + 1], [rows[i]]))
        for field in ("token", "logprob", "top_tokens", "top_logprobs", "invalid"):
            assert getattr(together, field)[i].tolist() == getattr(alone, field)[0].tolist(), (i, field)
    assert together.invalid.tolist() == [False, False, False, True, False]


def test_rows_with_nan_or_inf_are_flagged_and_the_others_sampled() -> None:
    logits = np.zeros((3, 10), np.float32)
    logits[0, 3] = np.nan
    logits[2, 0] = -np.inf
    result = sample_numpy(make_sample_batch(logits, [RowParams(seed=1)] * 3))
    assert result.invalid.tolist() == [True, False, True]
    assert result.token[0] == -1 and 0 <= result.token[1] < 10


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"top_p": 0.0}, "rows[1].top_p"),
        ({"top_p": 1.5}, "rows[1].top_p"),
        ({"top_p": math.nan}, "rows[1].top_p"),
        ({"top_k": -1}, "rows[1].top_k"),
        ({"min_p": 1.5}, "rows[1].min_p"),
        ({"temperature": -0.1}, "rows[1].temperature"),
        ({"temperature": math.inf}, "rows[1].temperature"),
        ({"repetition_penalty": 0.0}, "rows[1].repetition_penalty"),
        ({"history": [3, 10], "presence_penalty": 0.5}, "rows[1].history"),
        ({"top_logprobs": 21}, "rows[1].top_logprobs"),
    ],
)
def test_bad_parameters_name_their_field(change: dict[str, object], field: str) -> None:
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(FieldError) as info:
        make_sample_batch(logits, [RowParams(), RowParams(**change)])  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize(
    ("logits", "rows", "field"),
    [
        (np.zeros((2, 10), np.float32), 1, "rows"),
        (np.zeros((0, 10), np.float32), 0, "logits.shape"),
        (np.zeros((2, 0), np.float32), 2, "logits.shape"),
        (np.zeros((2, 11), np.float32), 2, "logits.shape"),
        (np.zeros((3, 10), np.float32), 3, "logits.shape"),
        (np.zeros((2, 10), np.int32), 2, "logits.dtype"),
    ],
)
def test_bad_shapes_name_their_field(logits: npt.NDArray[np.generic], rows: int, field: str) -> None:
    with pytest.raises(FieldError) as info:
        make_sample_batch(logits, [RowParams()] * rows, SampleLimits(max_vocab=10, max_rows=2))  # type: ignore[arg-type]
    assert info.value.field == field


# ---- CuPy against NumPy (needs a CUDA device) ---------------------------------------------


@pytest.fixture(scope="module")
def cupy_backend() -> object:
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    from services.postproc.backends import CupyBackend

    return CupyBackend()


def assert_backends_agree(got: object, want: object) -> None:
    np.testing.assert_array_equal(got.invalid, want.invalid)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got.token, want.token)  # type: ignore[attr-defined]
    np.testing.assert_allclose(got.logprob, want.logprob, rtol=1e-5, atol=1e-5)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got.top_tokens, want.top_tokens)  # type: ignore[attr-defined]
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)  # type: ignore[attr-defined]


row_params = st.builds(
    RowParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 0, 1, 2, 5, 50]),
    top_p=st.sampled_from([1.0, 1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.0, 0.05, 0.5]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    presence_penalty=st.sampled_from([0.0, 0.4]),
    frequency_penalty=st.sampled_from([0.0, 0.2]),
    history=st.lists(st.integers(0, 7), max_size=6),
    seed=st.integers(0, 2**64 - 1),
    top_logprobs=st.sampled_from([0, 1, 5, 20]),
)
gpu_logits = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(8, 3000)),
    elements=st.floats(-20, 20, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
)


def random_batch(
    rng: np.random.Generator, rows: int, vocab: int, dtype: type, params: Sequence[RowParams] | None = None
) -> SampleBatch:
    logits = (rng.normal(size=(rows, vocab)) * rng.uniform(0.5, 4, size=(rows, 1))).astype(dtype)
    if params is None:
        params = [
            RowParams(
                temperature=float(rng.choice([0.0, 0.7, 1.0])),
                top_k=int(rng.choice([0, 1, 40, 1000])),
                top_p=float(rng.choice([1.0, 0.9, 0.5])),
                min_p=float(rng.choice([0.0, 0.01])),
                repetition_penalty=1.2,
                frequency_penalty=0.1,
                history=rng.integers(0, vocab, size=32).tolist(),
                seed=int(rng.integers(0, 2**63)),
                top_logprobs=int(rng.choice([0, 5, 20])),
            )
            for _ in range(rows)
        ]
    return make_sample_batch(logits, params, SampleLimits(max_rows=rows))


def check_generated_rows(
    sample: Callable[[SampleBatch], SampleResult], logits: npt.NDArray[np.float32], data: st.DataObject, half: bool
) -> None:
    """One generated row parameter set a row of ``logits``: ``sample`` agrees with NumPy."""
    params = [data.draw(row_params) for _ in range(logits.shape[0])]
    batch = make_sample_batch(logits.astype(np.float16) if half else logits, params)
    assert_backends_agree(sample(batch), sample_numpy(batch))


@pytest.mark.gpu
@settings(max_examples=120, deadline=None)
@given(gpu_logits, st.data(), st.booleans())
def test_cupy_agrees_with_numpy_on_generated_rows(
    cupy_backend: object, logits: npt.NDArray[np.float32], data: st.DataObject, half: bool
) -> None:
    check_generated_rows(cupy_backend.sample, logits, data, half)  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 32000), (8, 128256), (3, 262144), (64, 32001), (200, 4096)])
def test_cupy_agrees_with_numpy_on_large_vocabularies(cupy_backend: object, rows: int, vocab: int, dtype: type) -> None:
    batch = random_batch(np.random.default_rng(rows * vocab), rows, vocab, dtype)
    assert_backends_agree(cupy_backend.sample(batch), sample_numpy(batch))  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
def test_every_cluster_size_gives_the_same_tokens(cupy_backend: object, cluster: int) -> None:
    batch = random_batch(np.random.default_rng(cluster), 16, 30000, np.float32)  # fits one CTA
    sampler = cupy_backend.sampler  # type: ignore[attr-defined]
    prepared = sampler.prepare(batch)
    sampler.launch(prepared, cluster=cluster, fast=False)
    assert_backends_agree(sampler.download(prepared, batch.max_top_logprobs), sample_numpy(batch))


def test_fast_path_takes_greedy_rows_and_small_top_k() -> None:
    rows = [RowParams(temperature=0), RowParams(top_k=1), RowParams(top_k=FAST_MAX_K), RowParams(top_k=0)]
    rows += [RowParams(top_k=FAST_MAX_K + 1), RowParams(top_k=5000)]  # the last: top-k off (over the vocab)
    batch = make_sample_batch(np.zeros((6, 1000), np.float32), rows)
    assert fast_rows(batch).tolist() == [True, True, True, False, False, False]


def check_fast_path_and_fused_kernel(sampler: object, vocab: int, dtype: type, grid: Iterable[tuple]) -> None:
    """Rows of every (temperature, top-k, top-p, min-p, top-n) in ``grid``, some with many ties
    and some all tied, sampled by the fast path (which gives the all-tied rows back) and by the
    fused kernel alone, against NumPy."""
    params = [
        RowParams(temperature=t, top_k=k, top_p=p, min_p=m, top_logprobs=n, seed=i)
        for i, (t, k, p, m, n) in enumerate(grid)
    ]
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(len(params), vocab)) * rng.uniform(0.5, 4, size=(len(params), 1))
    logits[::7] = np.round(logits[::7])  # many ties
    logits[::11] = 0  # all tied: the fast path's lists overflow and the fused kernel takes the row
    batch = make_sample_batch(logits.astype(dtype), params, SampleLimits(max_rows=len(params)))
    want = sample_numpy(batch)
    assert sampler.fast_path, "the backend's start-up check turned the fast path off"  # type: ignore[attr-defined]
    for fast in (True, False):
        prepared = sampler.prepare(batch)  # type: ignore[attr-defined]
        sampler.launch(prepared, fast=fast)  # type: ignore[attr-defined]
        assert_backends_agree(sampler.download(prepared, batch.max_top_logprobs), want)  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("vocab", [700, 8193, 32001, 131072])
def test_fast_path_and_fused_kernel_agree_with_numpy(cupy_backend: object, vocab: int, dtype: type) -> None:
    grid = itertools.product([0.0, 0.8], [1, 2, 40, FAST_MAX_K, FAST_MAX_K + 1], [1.0, 0.5], [0.0, 0.05], [0, 20])
    check_fast_path_and_fused_kernel(cupy_backend.sampler, vocab, dtype, grid)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def emulated_sampler() -> CupySampler:
    # One SM: batches of two or more rows, or of up to 16k logits, run in clusters of one CTA,
    # the only kind the emulator runs.
    kernels = ["llf_penalties", "llf_scan", "llf_finish"]
    kernels += [f"llf_sample{kind}_c{c}" for kind in ("", "_list") for c in CLUSTER_SIZES]
    return CupySampler(emulated_cupy(kernels), 1, EmuStream(), graphs=False)


@pytest.mark.emulator
@pytest.mark.parametrize(("vocab", "dtype"), [(700, np.float16), (8193, np.float32)])
def test_fast_path_and_fused_kernel_agree_with_numpy_on_the_cuda_emulator(
    emulated_sampler: CupySampler, vocab: int, dtype: type
) -> None:
    grid = itertools.product([0.0, 0.8], [1, 40, FAST_MAX_K + 1], [1.0, 0.5], [0.05], [0, 20])  # smaller than the GPU's
    check_fast_path_and_fused_kernel(emulated_sampler, vocab, dtype, grid)


@pytest.mark.emulator
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gpu_logits, st.data(), st.booleans())
def test_the_sampler_agrees_with_numpy_on_generated_rows_on_the_cuda_emulator(
    emulated_sampler: CupySampler, logits: npt.NDArray[np.float32], data: st.DataObject, half: bool
) -> None:
    check_generated_rows(emulated_sampler.sample, logits, data, half)


@pytest.mark.emulator
def test_subnormal_logits_count_as_zero_on_the_cuda_emulator_as_on_the_gpu(emulated_sampler: CupySampler) -> None:
    logits = np.zeros((2, 3000), np.float32)
    logits[0, 1] = 1e-45  # flushed: the greedy token is the first of the tied zeros
    batch = make_sample_batch(logits, [RowParams(temperature=0)] * 2)
    assert emulated_sampler.sample(batch).token.tolist() == sample_numpy(batch).token.tolist() == [0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("params", CHI_CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_cupy_draws_follow_the_filtered_softmax(cupy_backend: object, params: RowParams) -> None:
    tokens = sample_many(cupy_backend.sample, CHI_LOGITS, params, 50_000)  # type: ignore[attr-defined]
    assert_matches_distribution(tokens, filtered_distribution(CHI_LOGITS, params))


@pytest.mark.gpu
def test_cupy_flags_nan_and_inf_rows(cupy_backend: object) -> None:
    logits = np.zeros((3, 5000), np.float32)
    logits[0, 4999] = np.inf
    logits[2, 17] = np.nan
    result = cupy_backend.sample(make_sample_batch(logits, [RowParams(seed=1)] * 3))  # type: ignore[attr-defined]
    assert result.invalid.tolist() == [True, False, True]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32001, 131072])
def test_staged_calls_and_graph_replays_agree_with_numpy(cupy_backend: object, vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for penalty in (1.0, 1.2):  # without penalties the batch is captured into a graph, then replayed
        calls = []
        for n in (1, 3, 2):
            x = (rng.normal(size=(n, vocab)) * 3).astype(np.float32)
            rows = [
                RowParams(top_k=40, top_p=0.9, seed=int(s), top_logprobs=2, repetition_penalty=penalty, history=[1, 2])
                for s in rng.integers(1 << 30, size=n)
            ]
            calls.append(make_sample_batch(x, rows))
        want = sample_numpy(concat_sample_batches(calls))
        for _ in range(2):
            assert_backends_agree(cupy_backend.sample_batches(calls), want)  # type: ignore[attr-defined]
    assert cupy_backend.sampler.graphs  # type: ignore[attr-defined]


@pytest.mark.gpu
def test_logits_in_registered_shared_memory_go_up_by_dma_and_agree_with_numpy(cupy_backend: object) -> None:
    from llamafleet.shared_tensors import SharedTensorRegion
    from services.postproc.shared_memory import SharedRegions

    rng = np.random.default_rng(11)
    with SharedTensorRegion(16 << 20) as shm:
        regions = SharedRegions(shm.byte_size, cupy_backend.pin_host, cupy_backend.unpin_host)  # type: ignore[attr-defined]
        assert regions.register("t", shm.register_request().key, shm.byte_size)
        calls, offset = [], 0
        for n in (3, 1, 5):  # shared and pageable calls merged into one batch
            x = (rng.normal(size=(n, 32000)) * 3).astype(np.float32)
            rows = [RowParams(top_k=40, top_p=0.9, seed=int(s), top_logprobs=2) for s in rng.integers(1 << 30, size=n)]
            if n != 1:
                shm.array(offset, x.shape)[...] = x
                x = regions.view("logits", "t", offset, x.nbytes).view(np.float32).reshape(x.shape)
                assert cupy_backend.sampler._page_locked(x)  # type: ignore[attr-defined]
                offset += x.nbytes
            calls.append(make_sample_batch(x, rows))
        want = sample_numpy(concat_sample_batches(calls))
        for _ in range(2):
            assert_backends_agree(cupy_backend.sample_batches(calls), want)  # type: ignore[attr-defined]
        del calls, x
        regions.close()
