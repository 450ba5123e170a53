"""Which prompt prefixes each worker's llama-server holds, as routing history and results tell.

A prompt is cut into blocks of `BLOCK_CHARS` characters, each named by a hash chained over
every block before it, so equal hashes mean equal prefixes (an approximate radix tree, as in
SGLang's router, at block granularity). Per worker the index keeps two sets:

- cached: blocks of prompts the worker finished, least recently used first. llama-server keeps
  a finished prompt in its slot and, once the slot moves on, in its host-RAM prompt cache, so
  a later prompt with that prefix skips its prefill there;
- pending: blocks of prompts in flight. They are not reusable by another request until that
  one ends: llama.cpp shares no prompt between slots while both run, so a second request sent
  now computes the prefix again, even one the worker had cached before (it sits in the busy
  slot).

Characters, not tokens: a shared character prefix is a shared token prefix up to the last
token or two of it, and characters need no tokenizer round trip per request.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

BLOCK_CHARS = 64


def prompt_blocks(prompt: str, block_chars: int = BLOCK_CHARS) -> list[int]:
    """The chained hashes of the prompt's whole blocks (a shorter tail is not counted)."""
    hashes: list[int] = []
    h = 0
    for start in range(0, len(prompt) - block_chars + 1, block_chars):
        h = hash((h, prompt[start : start + block_chars]))
        hashes.append(h)
    return hashes


@dataclass(frozen=True)
class Match:
    """How many leading blocks of a prompt a worker can reuse now (`cached`), and once its
    requests in flight have ended (`pending`)."""

    cached: int
    pending: int


@dataclass
class _WorkerBlocks:
    cached: collections.OrderedDict[int, None] = field(default_factory=collections.OrderedDict)
    pending: collections.Counter[int] = field(default_factory=collections.Counter)


class PrefixIndex:
    """Per-worker cached and in-flight prompt blocks; at most `capacity_blocks` cached per worker."""

    def __init__(self, capacity_blocks: int = 1 << 16) -> None:
        self.capacity_blocks = capacity_blocks
        self._workers: dict[int, _WorkerBlocks] = collections.defaultdict(_WorkerBlocks)

    def match(self, rank: int, blocks: Sequence[int]) -> Match:
        """Leading blocks of `blocks` that `rank` has cached (and no request is using), and cached or pending."""
        worker = self._workers.get(rank)
        if worker is None:
            return Match(0, 0)
        cached = 0
        # A block in use by a request in flight is not reusable by another one: llama.cpp
        # holds it in that request's slot alone until the slot moves on.
        while cached < len(blocks) and blocks[cached] in worker.cached and blocks[cached] not in worker.pending:
            cached += 1
        pending = cached
        while pending < len(blocks) and (blocks[pending] in worker.cached or blocks[pending] in worker.pending):
            pending += 1
        return Match(cached, pending)

    def start(self, rank: int, blocks: Sequence[int]) -> None:
        """A prompt was sent to `rank`: its blocks are in flight there."""
        self._workers[rank].pending.update(blocks)

    def finish(self, rank: int, blocks: Sequence[int], *, cached: bool) -> None:
        """A prompt sent to `rank` ended; `cached` when llama-server now holds it (it completed)."""
        worker = self._workers[rank]
        worker.pending.subtract(blocks)
        for block in blocks:
            if worker.pending[block] <= 0:
                del worker.pending[block]
        if cached:
            for block in blocks:
                worker.cached[block] = None
                worker.cached.move_to_end(block)
            while len(worker.cached) > self.capacity_blocks:
                worker.cached.popitem(last=False)

    def evicted(self, rank: int, block: int) -> None:
        """llama-server no longer held `block`, which the index had cached: it evicts least
        recently used first, so every block used before it is gone too."""
        worker = self._workers.get(rank)
        if worker is None or block not in worker.cached:
            return
        while worker.cached:
            oldest, _ = worker.cached.popitem(last=False)
            if oldest == block:
                return
