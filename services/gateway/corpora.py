"""Named document corpora: texts embedded by the fleet, searched on postproc, kept in storage.

Each change of a corpus writes a new version to storage, a content-addressed artifact (an .npz
holding the embedding model's digest, the documents' ids and texts, and their unit vectors),
and moves the tag `corpora/<name>:latest` to it. Postproc holds the vectors on its device under
the corpus's name; a postproc that restarted has lost them, so a corpus it does not know (or
holds only in part) is loaded back from its latest version on first use.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import grpc
import numpy as np
import numpy.typing as npt

from llamafleet.errors import FailedPrecondition, InvalidArgument, NotFound
from llamafleet.storage_client import StorageClient
from llamafleet.tensors import float32_tensor
from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc, storage_pb2

MEDIA_TYPE = "application/vnd.llamafleet.corpus+npz"
TAG_PREFIX = "corpora/"
# Storage's name rules (lower case, parts joined by . or -), so a corpus name is a tag name too.
_NAME = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*")
MAX_NAME_CHARS = 64
POSTPROC_TIMEOUT_S = 30.0


def validate_corpus_name(name: str) -> None:
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            "corpus", f"must be 1 to {MAX_NAME_CHARS} lower-case letters and digits, joined by . or -; got {name!r}"
        )


@dataclass(frozen=True)
class CorpusVersion:
    """One version of a corpus: documents in insertion order, with their unit vectors."""

    model_sha256: str
    ids: list[str]
    texts: list[str]
    vectors: npt.NDArray[np.float32]  # [documents, dim]

    def with_documents(
        self, ids: Sequence[str], texts: Sequence[str], vectors: npt.NDArray[np.float32]
    ) -> CorpusVersion:
        """This version with the documents added; an id already here takes its new text and vector."""
        all_ids, all_texts = list(self.ids), list(self.texts)
        index = {id_: i for i, id_ in enumerate(all_ids)}
        rows = self.vectors.copy()
        new_rows = []
        for id_, text, vector in zip(ids, texts, vectors, strict=True):
            at = index.get(id_)
            if at is None:
                index[id_] = len(all_ids)
                all_ids.append(id_)
                all_texts.append(text)
                new_rows.append(vector)
            else:
                all_texts[at] = text
                rows[at] = vector
        added = np.asarray(new_rows, dtype=np.float32).reshape(-1, rows.shape[1])
        return CorpusVersion(self.model_sha256, all_ids, all_texts, np.concatenate([rows, added]))

    @cached_property
    def text_by_id(self) -> dict[str, str]:
        # Built once per version, not per search.
        return dict(zip(self.ids, self.texts, strict=True))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        documents = json.dumps({"model_sha256": self.model_sha256, "ids": self.ids, "texts": self.texts}).encode()
        np.savez(buffer, documents=np.frombuffer(documents, dtype=np.uint8), vectors=self.vectors)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CorpusVersion:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            documents = json.loads(npz["documents"].tobytes())
            vectors = np.asarray(npz["vectors"], dtype=np.float32)
        return cls(documents["model_sha256"], documents["ids"], documents["texts"], vectors)


class Corpora:
    """The corpora, through storage (versions) and postproc (vectors on the device)."""

    def __init__(self, storage: StorageClient, postproc: postproc_pb2_grpc.PostprocStub) -> None:
        self._storage = storage
        self._postproc = postproc
        # The latest version of each corpus this gateway read or wrote.
        self._versions: dict[str, CorpusVersion] = {}
        # One change at a time per corpus: each writes a version built on the one before.
        self._locks: dict[str, asyncio.Lock] = {}

    async def find(self, name: str) -> CorpusVersion | None:
        """The corpus's latest version; None when it has none."""
        validate_corpus_name(name)
        if (version := self._versions.get(name)) is not None:
            return version
        try:
            info = await self._storage.resolve(f"{TAG_PREFIX}{name}:latest")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        version = CorpusVersion.from_bytes(await self._storage.read_bytes(info.sha256))
        self._versions[name] = version
        return version

    async def get(self, name: str) -> CorpusVersion:
        """The corpus's latest version; NOT_FOUND when it has none."""
        version = await self.find(name)
        if version is None:
            raise NotFound(f"corpus: no corpus {name!r} (add documents to create it)")
        return version

    async def add(
        self, name: str, model_sha256: str, ids: Sequence[str], texts: Sequence[str], vectors: npt.NDArray[np.float32]
    ) -> CorpusVersion:
        """Add documents embedded by `model_sha256`; creates the corpus. Returns the new version."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = await self.find(name)
            if current is None:
                current = CorpusVersion(model_sha256, [], [], np.zeros((0, vectors.shape[1]), np.float32))
            elif current.model_sha256 != model_sha256:
                raise FailedPrecondition(
                    f"corpus {name!r} holds vectors of model {current.model_sha256[:12]}, not {model_sha256[:12]}: "
                    "add to it with that model (or to a new corpus)"
                )
            version = current.with_documents(ids, texts, vectors)
            stored = await self._storage.upload_bytes(
                version.to_bytes(), f"{name}.npz", kind=storage_pb2.ARTIFACT_KIND_OTHER, media_type=MEDIA_TYPE
            )
            await self._storage.tag(f"{TAG_PREFIX}{name}", "latest", stored.info.sha256)
            self._versions[name] = version
            added = await self._postproc.AddToCorpus(
                postproc_pb2.AddToCorpusRequest(corpus=name, vectors=float32_tensor(vectors), ids=ids),
                timeout=POSTPROC_TIMEOUT_S,
            )
            if added.size != len(version.ids):
                await self._load(name, version)  # postproc had lost the rest (it restarted)
            return version

    async def search(self, name: str, query: npt.NDArray[np.float32], top_k: int) -> list[tuple[str, str, float]]:
        """(id, text, cosine score) of the `top_k` documents nearest to `query`, best first."""
        version = await self.get(name)
        request = postproc_pb2.SearchCorpusRequest(corpus=name, queries=float32_tensor(query[None, :]), top_k=top_k)
        try:
            response = await self._postproc.SearchCorpus(request, timeout=POSTPROC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            await self._load(name, version)
            response = await self._postproc.SearchCorpus(request, timeout=POSTPROC_TIMEOUT_S)
        text = version.text_by_id
        return [(hit.id, text.get(hit.id, ""), hit.score) for hit in response.results[0].hits]

    async def _load(self, name: str, version: CorpusVersion) -> None:
        """Put the whole version on postproc, replacing whatever it held under the name."""
        try:
            await self._postproc.RemoveFromCorpus(
                postproc_pb2.RemoveFromCorpusRequest(corpus=name), timeout=POSTPROC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await self._postproc.AddToCorpus(
            postproc_pb2.AddToCorpusRequest(corpus=name, vectors=float32_tensor(version.vectors), ids=version.ids),
            timeout=POSTPROC_TIMEOUT_S,
        )
