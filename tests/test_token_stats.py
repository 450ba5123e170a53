"""Token statistics: NumPy against a plain-Python reference, and CuPy against NumPy on a GPU."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
from cuda_emu import emulated_cupy
from hypothesis import given, settings
from hypothesis import strategies as st

from services.postproc import backends
from services.postproc.backends import (
    BackendUnavailableError,
    CupyBackend,
    NumpyBackend,
    select_backend,
)
from services.postproc.token_stats import (
    PackedBatch,
    TokenStatsResult,
    log_threshold,
    pack_batch,
    token_stats_numpy,
    tokens_from_completion_probabilities,
)

Token = tuple[float, Sequence[float]]
Response = Sequence[Token]

# float32 inputs and float32 per-token maths: a few ulp of values up to log(32) ≈ 3.5.
ENTROPY_ATOL = 2e-5
ENTROPY_RTOL = 1e-5
# CuPy vs NumPy: both float32 per token (expf/logf vs NumPy's SIMD exp/log, different
# summation order), float64 means.
GPU_RTOL = 1e-5
GPU_ATOL = 1e-5


# ---- plain-Python reference (float64, one token at a time) -------------------------------


def f32(x: float) -> float:
    """The value the packed float32 batch actually holds."""
    return float(np.float32(x))


def f32_chosen(x: float) -> float:
    """A chosen logprob as packed: float32, subnormals flushed to 0."""
    v = f32(x)
    return 0.0 if abs(v) < float(np.finfo(np.float32).tiny) else v


def ref_entropy(top: Sequence[float]) -> float:
    finite = [f32(x) for x in top if x != -math.inf]
    if not finite:
        return math.nan
    z = sum(math.exp(x) for x in finite)
    ps = [math.exp(x) / z for x in finite]
    return -sum(p * math.log(p) for p in ps if p > 0)


def ref_response(tokens: Response, threshold: float = 0.5) -> dict[str, float]:
    n = len(tokens)
    if n == 0:
        return {
            "mean_logprob": math.nan,
            "perplexity": math.nan,
            "mean_entropy": math.nan,
            "confident_fraction": math.nan,
        }
    chosen = [f32_chosen(c) for c, _ in tokens]
    mean = sum(chosen) / n
    entropies = [h for h in (ref_entropy(top) for _, top in tokens) if not math.isnan(h)]
    log_thr = float(np.float32(math.log(threshold)))
    return {
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if mean > -700 else math.inf,
        "mean_entropy": sum(entropies) / len(entropies) if entropies else math.nan,
        "confident_fraction": sum(c >= log_thr for c in chosen) / n,
    }


def assert_matches_reference(responses: Sequence[Response], result: TokenStatsResult, threshold: float = 0.5) -> None:
    assert len(result) == len(responses)
    for tokens, stats in zip(responses, result, strict=True):
        assert stats.n_tokens == len(tokens)
        np.testing.assert_allclose(
            stats.entropy, [ref_entropy(top) for _, top in tokens], rtol=ENTROPY_RTOL, atol=ENTROPY_ATOL
        )
        np.testing.assert_array_equal(
            stats.surprise, np.asarray([0.0 - f32_chosen(c) for c, _ in tokens], dtype=np.float32)
        )
        want = ref_response(tokens, threshold)
        assert stats.mean_logprob == pytest.approx(want["mean_logprob"], rel=1e-9, abs=1e-9, nan_ok=True)
        assert stats.perplexity == pytest.approx(want["perplexity"], rel=1e-9, nan_ok=True)
        assert stats.mean_entropy == pytest.approx(
            want["mean_entropy"], rel=ENTROPY_RTOL, abs=ENTROPY_ATOL, nan_ok=True
        )
        assert stats.confident_fraction == pytest.approx(want["confident_fraction"], nan_ok=True)


def numpy_stats(responses: Sequence[Response], threshold: float = 0.5) -> TokenStatsResult:
    return token_stats_numpy(pack_batch(responses), confidence_threshold=threshold)


# ---- hand examples ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32])
def test_uniform_top_n_has_entropy_log_n(n: int) -> None:
    stats = numpy_stats([[(-math.log(n), [-math.log(n)] * n)]])[0]
    assert stats.entropy[0] == pytest.approx(math.log(n), abs=1e-6)
    assert stats.mean_entropy == pytest.approx(math.log(n), abs=1e-6)


def test_a_certain_token_has_perplexity_one_and_zero_entropy() -> None:
    stats = numpy_stats([[(0.0, [0.0])]])[0]
    assert stats.mean_logprob == 0.0
    assert stats.perplexity == 1.0
    assert stats.entropy[0] == 0.0
    assert stats.surprise[0] == 0.0 and not math.copysign(1.0, float(stats.surprise[0])) < 0
    assert stats.confident_fraction == 1.0


def test_entropy_renormalises_the_top_n_and_ignores_the_tail() -> None:
    # p = (0.3, 0.1) renormalises to (0.75, 0.25): the 0.6 tail mass does not count.
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    stats = numpy_stats([[(math.log(0.3), [math.log(0.3), math.log(0.1)])]])[0]
    assert stats.entropy[0] == pytest.approx(expected, abs=1e-6)


def test_perplexity_is_exp_of_minus_mean_logprob() -> None:
    tokens = [(-0.5, [-0.5, -1.0]), (-2.0, [-0.2, -2.0]), (-0.1, [-0.1])]
    stats = numpy_stats([tokens])[0]
    assert stats.mean_logprob == pytest.approx(-2.6 / 3, rel=1e-6)
    assert stats.perplexity == pytest.approx(math.exp(2.6 / 3), rel=1e-6)
    assert_matches_reference([tokens], numpy_stats([tokens]))


def test_confidence_threshold_is_inclusive_and_configurable() -> None:
    tokens = [(math.log(0.5), [math.log(0.5)]), (math.log(0.49), [0.0]), (math.log(0.95), [0.0])]
    assert numpy_stats([tokens])[0].confident.tolist() == [True, False, True]
    assert numpy_stats([tokens], threshold=0.9)[0].confident_fraction == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        numpy_stats([tokens], threshold=0.0)
    with pytest.raises(ValueError):
        numpy_stats([tokens], threshold=1.5)


def test_empty_responses_get_nan_scalars_and_do_not_disturb_neighbours() -> None:
    responses: list[Response] = [[], [(-0.1, [-0.1, -3.0])], [], [], [(-1.0, [-0.5, -1.0]), (-0.2, [-0.2])], []]
    result = numpy_stats(responses)
    assert result.n_tokens.tolist() == [0, 1, 0, 0, 2, 0]
    for r in (0, 2, 3, 5):
        stats = result[r]
        assert stats.n_tokens == 0 and stats.entropy.size == 0
        assert all(math.isnan(x) for x in (stats.mean_logprob, stats.perplexity, stats.mean_entropy))
        assert math.isnan(stats.confident_fraction)
    assert_matches_reference(responses, result)


def test_no_responses_and_only_empty_responses() -> None:
    assert len(numpy_stats([])) == 0
    result = numpy_stats([[], []])
    assert len(result) == 2 and result.entropy.size == 0
    assert np.isnan(result.mean_logprob).all()


def test_tokens_without_top_entries_have_nan_entropy_outside_the_mean() -> None:
    responses: list[Response] = [[(-0.5, []), (-0.1, [-0.1, -2.4])], [(-0.3, [])]]
    result = numpy_stats(responses)
    assert math.isnan(result[0].entropy[0])
    assert result[0].mean_entropy == pytest.approx(float(result[0].entropy[1]))
    assert math.isnan(result[1].mean_entropy)
    assert result[1].mean_logprob == pytest.approx(-0.3)
    assert_matches_reference(responses, result)


def test_impossible_chosen_token_gives_infinite_perplexity() -> None:
    stats = numpy_stats([[(-math.inf, [-0.1, -3.0]), (-0.1, [-0.1])]])[0]
    assert stats.mean_logprob == -math.inf
    assert stats.perplexity == math.inf
    assert stats.surprise[0] == math.inf


def test_subnormal_chosen_logprobs_are_flushed_to_zero() -> None:
    # The GPU runs flush-to-zero; flushing at packing time keeps the backends identical.
    stats = numpy_stats([[(-1e-43, [-1e-43]), (-1e-30, [-1e-30])]], threshold=1.0)[0]
    assert stats.surprise.tolist() == [0.0, pytest.approx(1e-30)]
    assert stats.confident.tolist() == [True, False]


def test_explicit_minus_inf_entries_carry_no_probability() -> None:
    a = numpy_stats([[(-0.7, [-0.7, -1.2, -math.inf])]])[0]
    b = numpy_stats([[(-0.7, [-0.7, -1.2])]])[0]
    assert a.entropy[0] == b.entropy[0]


def test_packing_pads_with_minus_inf_in_csr_order() -> None:
    packed = pack_batch([[(-0.1, [-0.1, -2.0]), (-0.5, [])], [], [(-1.0, [-1.0, -1.5, -2.0])]])
    assert packed.offsets.tolist() == [0, 2, 2, 3]
    assert packed.top_logprobs.shape == (3, 3) and packed.top_logprobs.dtype == np.float32
    assert packed.top_logprobs[0].tolist() == [pytest.approx(-0.1), -2.0, -math.inf]
    assert np.isneginf(packed.top_logprobs[1]).all()
    assert packed.chosen_logprob.tolist() == [pytest.approx(-0.1), -0.5, -1.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_plus_inf_are_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        pack_batch([[(bad, [-0.1])]])
    with pytest.raises(ValueError):
        pack_batch([[(-0.1, [-0.1, bad])]])


def test_inconsistent_offsets_are_refused() -> None:
    top = np.zeros((3, 2), dtype=np.float32)
    chosen = np.zeros(3, dtype=np.float32)
    for offsets in ([0, 2], [1, 3], [0, 2, 1, 3]):
        with pytest.raises(ValueError):
            PackedBatch(top, chosen, np.asarray(offsets))


def test_llama_server_completion_probabilities_are_read_in_both_formats() -> None:
    logprob_items = [
        {"id": 1, "token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}, {"logprob": -2.5}]},
        {"id": 2, "token": "b", "logprob": -0.3},
    ]
    prob_items = [{"token": "a", "prob": 0.5, "top_probs": [{"prob": 0.5}, {"prob": 0.0}]}]
    assert tokens_from_completion_probabilities(logprob_items) == [(-0.1, [-0.1, -2.5]), (-0.3, [])]
    assert tokens_from_completion_probabilities(prob_items) == [(math.log(0.5), [math.log(0.5), -math.inf])]


# ---- backend selection --------------------------------------------------------------------


def test_modules_import_without_cupy_grpc_or_opentelemetry() -> None:
    code = (
        "import sys, services.postproc.backends, services.postproc.token_stats\n"
        "heavy = [m for m in ('cupy', 'grpc', 'opentelemetry', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_select_backend_honours_numpy_and_refuses_unknown_names() -> None:
    backend = select_backend("NumPy")
    assert isinstance(backend, NumpyBackend)
    assert backend.name == "numpy" and backend.device_description.startswith("CPU (numpy ")
    assert backend.device_memory() == (0, 0)
    with pytest.raises(ValueError, match="auto, cupy, numpy"):
        select_backend("tpu")


def test_auto_always_gives_a_working_backend() -> None:
    backend = select_backend("auto")
    assert backend.name in ("cupy", "numpy") and backend.reason.startswith("auto")
    result = backend.token_stats(pack_batch([[(0.0, [0.0])]]))
    assert result[0].perplexity == pytest.approx(1.0)


def test_cupy_request_without_a_device_raises() -> None:
    if _cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailableError):
        select_backend("cupy")


# ---- properties ---------------------------------------------------------------------------

logprobs = st.floats(min_value=-40.0, max_value=0.0, width=32)
tokens = st.tuples(logprobs, st.lists(logprobs | st.just(-math.inf), max_size=32))
batches = st.lists(st.lists(tokens, max_size=12), max_size=6)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_numpy_matches_the_plain_python_reference(responses: list[list[Token]]) -> None:
    assert_matches_reference(responses, numpy_stats(responses))


@settings(max_examples=100, deadline=None)
@given(batches, st.floats(min_value=0.01, max_value=1.0))
def test_statistics_stay_in_range(responses: list[list[Token]], threshold: float) -> None:
    result = numpy_stats(responses, threshold)
    for tokens_, stats in zip(responses, result, strict=True):
        for (_, top), h in zip(tokens_, stats.entropy, strict=True):
            k = sum(x != -math.inf for x in top)
            if k == 0:
                assert math.isnan(h)
            else:
                assert 0.0 <= h <= math.log(k) + ENTROPY_ATOL
        if stats.n_tokens:
            assert 0.0 <= stats.confident_fraction <= 1.0
            assert stats.perplexity >= 1.0 - 1e-12


@settings(max_examples=100, deadline=None)
@given(batches)
def test_a_batch_equals_its_responses_taken_one_at_a_time(responses: list[list[Token]]) -> None:
    batch = numpy_stats(responses)
    for tokens_, stats in zip(responses, batch, strict=True):
        alone = numpy_stats([tokens_])[0]
        np.testing.assert_allclose(stats.entropy, alone.entropy, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(stats.confident, alone.confident)
        assert stats.mean_logprob == pytest.approx(alone.mean_logprob, nan_ok=True)


@settings(max_examples=100, deadline=None)
@given(batches)
def test_entropy_ignores_the_order_of_the_top_entries(responses: list[list[Token]]) -> None:
    flipped = [[(c, list(reversed(top))) for c, top in tokens_] for tokens_ in responses]
    np.testing.assert_allclose(numpy_stats(responses).entropy, numpy_stats(flipped).entropy, rtol=1e-6, atol=1e-6)


# ---- CuPy against NumPy (needs a CUDA device) ---------------------------------------------


def _cuda_device_count() -> int:
    try:
        import cupy
    except Exception:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@pytest.fixture(scope="module")
def cupy_backend() -> CupyBackend:
    pytest.importorskip("cupy")
    if _cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    return CupyBackend()


def assert_backends_agree(got: TokenStatsResult, want: TokenStatsResult) -> None:
    assert got.backend == "cupy" and want.backend == "numpy"
    assert_stats_agree(got, want)


def assert_stats_agree(got: TokenStatsResult, want: TokenStatsResult) -> None:
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_allclose(got.entropy, want.entropy, rtol=GPU_RTOL, atol=GPU_ATOL)
    np.testing.assert_array_equal(got.surprise, want.surprise)
    np.testing.assert_array_equal(got.confident, want.confident)
    for field in ("mean_logprob", "perplexity", "mean_entropy", "confident_fraction"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=GPU_RTOL, atol=GPU_ATOL)


def random_packed(rng: np.random.Generator, n_responses: int, max_tokens: int, width: int) -> PackedBatch:
    """Realistic rows: the top-`width` of a log-softmax over random logits, some rows shorter."""
    counts = rng.integers(0, max_tokens + 1, size=n_responses)
    counts[rng.random(n_responses) < 0.1] = 0
    total = int(counts.sum())
    logits = rng.normal(scale=rng.uniform(0.5, 6.0, size=(total, 1)), size=(total, max(width, 1) + 8))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = -np.sort(-logp, axis=1)[:, :width].astype(np.float32)
    lengths = rng.integers(0, width + 1, size=total)
    top[np.arange(width)[None, :] >= lengths[:, None]] = -np.inf
    chosen = np.where(rng.random(total) < 0.7, top[:, 0] if width else -0.3, logp[:, -1]).astype(np.float32)
    chosen[~np.isfinite(chosen)] = -5.0
    return PackedBatch(top, chosen, np.concatenate([[0], np.cumsum(counts)]))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n_responses", "max_tokens", "width"),
    [(1, 1, 1), (3, 50, 0), (8, 300, 5), (64, 500, 32), (200, 100, 20), (5, 2000, 40), (1000, 3, 32)],
)
def test_cupy_agrees_with_numpy_on_random_batches(
    cupy_backend: CupyBackend, n_responses: int, max_tokens: int, width: int
) -> None:
    rng = np.random.default_rng(n_responses * 1000 + width)
    packed = random_packed(rng, n_responses, max_tokens, width)
    for threshold in (0.5, 0.1, 1.0):
        assert_backends_agree(
            cupy_backend.token_stats(packed, confidence_threshold=threshold),
            token_stats_numpy(packed, confidence_threshold=threshold),
        )


@pytest.mark.emulator
@pytest.mark.parametrize(("n_responses", "max_tokens", "width"), [(1, 1, 1), (3, 50, 0), (9, 300, 20)])
def test_the_kernel_agrees_with_numpy_on_the_cuda_emulator(n_responses: int, max_tokens: int, width: int) -> None:
    packed = random_packed(np.random.default_rng(n_responses), n_responses, max_tokens, width)
    threshold = 0.5
    kernel = emulated_cupy(("llf_token_stats",)).RawModule(backends._KERNEL_SOURCE).get_function("llf_token_stats")
    t, r = packed.total_tokens, packed.n_responses
    entropy, surprise = np.empty(t, np.float32), np.empty(t, np.float32)
    confident, means = np.empty(t, np.uint8), np.empty((r, 4), np.float64)
    args = (packed.top_logprobs, packed.chosen_logprob, packed.offsets, np.int64(t), np.int32(packed.max_n))
    args += (np.int64(r), np.float32(log_threshold(threshold)), entropy, surprise, confident, means)
    kernel((min(r, 4),), (backends._STATS_BLOCK,), args)  # fewer CTAs than responses: the grid-stride loop runs
    got = TokenStatsResult(
        packed.offsets, entropy, surprise, confident.astype(bool), *means.T, threshold, backend="emulated kernel"
    )
    assert_stats_agree(got, token_stats_numpy(packed, confidence_threshold=threshold))


@pytest.mark.gpu
@pytest.mark.parametrize("pageable_min", [0, 1 << 62])
def test_cupy_uploads_from_pageable_or_pinned_memory_alike(
    cupy_backend: CupyBackend, monkeypatch: pytest.MonkeyPatch, pageable_min: int
) -> None:
    monkeypatch.setattr(backends, "PAGEABLE_UPLOAD_MIN_BYTES", pageable_min)
    for n_responses, width in ((40, 20), (3, 0)):
        packed = random_packed(np.random.default_rng(n_responses), n_responses, 400, width)
        assert_backends_agree(cupy_backend.token_stats(packed), token_stats_numpy(packed))


@pytest.mark.gpu
@settings(max_examples=150, deadline=None)
@given(batches)
def test_cupy_agrees_with_numpy_on_generated_batches(cupy_backend: CupyBackend, responses: list[list[Token]]) -> None:
    packed = pack_batch(responses)
    assert_backends_agree(cupy_backend.token_stats(packed), token_stats_numpy(packed))


@pytest.mark.gpu
def test_cupy_handles_edge_batches(cupy_backend: CupyBackend) -> None:
    for responses in ([], [[]], [[], [], []], [[(-math.inf, [-0.1, -2.0])]], [[(0.0, [0.0])], []]):
        packed = pack_batch(responses)
        assert_backends_agree(cupy_backend.token_stats(packed), token_stats_numpy(packed))
    assert cupy_backend.device_memory()[1] > 0
