"""Corpus versions as stored: documents added and replaced in order, and the bytes round trip."""

from __future__ import annotations

import numpy as np
import pytest

from llamafleet.errors import InvalidArgument
from services.gateway.corpora import CorpusVersion, validate_corpus_name


def test_documents_are_added_in_order_and_an_id_added_again_is_replaced() -> None:
    empty = CorpusVersion("m" * 64, [], [], np.zeros((0, 2), np.float32))
    first = empty.with_documents(["a", "b"], ["alpha", "beta"], np.eye(2, dtype=np.float32))
    second = first.with_documents(["b", "c"], ["bravo", "gamma"], np.array([[0.6, 0.8], [1, 0]], np.float32))
    assert second.ids == ["a", "b", "c"] and second.texts == ["alpha", "bravo", "gamma"]
    assert np.allclose(second.vectors, [[1, 0], [0.6, 0.8], [1, 0]])
    assert first.texts == ["alpha", "beta"] and first.vectors.tolist() == [[1, 0], [0, 1]]  # versions are immutable


def test_a_version_reads_back_from_its_bytes() -> None:
    version = CorpusVersion("d" * 64, ["x", "ü"], ['text with "quotes"', "naïve"], np.eye(2, dtype=np.float32))
    again = CorpusVersion.from_bytes(version.to_bytes())
    assert (again.model_sha256, again.ids, again.texts) == (version.model_sha256, version.ids, version.texts)
    assert np.array_equal(again.vectors, version.vectors) and again.vectors.dtype == np.float32
    assert version.to_bytes() == version.to_bytes()  # same content, same artifact


@pytest.mark.parametrize("name", ["", "Notes", "a b", "-a", "a--b", "x" * 65, "a/b"])
def test_corpus_names_follow_storage_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="corpus"):
        validate_corpus_name(name)
    validate_corpus_name("my-notes.v2")
