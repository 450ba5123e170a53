"""A tiny llama-architecture GGUF with random weights, generated deterministically.

It lets the whole fabric run real llama.cpp servers on any machine without downloading
weights. The same arguments always give byte-identical files.

The vocabulary holds only valid UTF-8 pieces and no byte tokens (`<0x..>`): a model that
samples a lone byte can stream invalid UTF-8, which llama-server refuses to send. The
tokenizer is SentencePiece's unigram model (`tokenizer.ggml.model = "t5"`, llama.cpp's UGM
tokenizer) rather than its BPE model ("llama", SPM): without byte tokens, SPM fails on any
character missing from the vocabulary (a tab, "é", an emoji: llama-server answers
`_Map_base::at`), while UGM maps such characters to `<unk>`.

    python -m llamafleet.demo_model OUT.gguf [--size tiny|bench] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import string
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

NAME = "llamafleet-demo"

# Frequent English words plus a few of the project's own, so prompts tokenize into words.
_WORD_TEXT = """
the of and to in a is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no will
more about up out who them what some could into than then its time only new other these two
may first any like now my over such our man me even most made after also did many before
must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come
since against go came right used take three hello hi yes fleet llama model token tokens stream
worker gateway server cache storage scheduler prompt request answer question data text
"""
WORDS = _WORD_TEXT.split()

CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class ModelShape:
    """Hyperparameters of the generated model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int


SIZES = {
    # About 0.25 MB; about 3800 generated tokens/s on one CPU core: for tests and the demo stack.
    "tiny": ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, context_length=4096),
    # About 63 MB (32M parameters in f16): prompt processing dominates (about 500 prompt
    # tokens/s and 200 generated tokens/s on one CPU core), for prefix-reuse and throughput
    # benchmarks.
    "bench": ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=2048, context_length=4096),
}


def demo_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: `<unk>`, `<s>`, `</s>`, then words, letters, digits, punctuation.

    "▁" stands for a leading space, as in SentencePiece. Every normal piece scores about -1,
    so the unigram tokenizer's best segmentation is the one with the fewest tokens (whole
    words first); the tiny decrements only make ties deterministic.
    """
    tokens = list(CONTROL_TOKENS)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    pieces = [f"▁{w}" for w in WORDS]
    pieces += [f"▁{c}" for c in string.ascii_letters + string.digits]
    pieces += list(string.ascii_letters + string.digits)
    pieces += ["▁", *string.punctuation, *(f"▁{c}" for c in "-(\"'"), "\n"]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * len(CONTROL_TOKENS) + [-1.0 - i * 1e-4 for i in range(len(tokens) - len(CONTROL_TOKENS))]
    return tokens, scores, [int(t) for t in types]


def write_demo_model(
    path: Path,
    *,
    seed: int = 0,
    size: str = "tiny",
    n_embd: int | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    context_length: int | None = None,
    pooling: str | None = None,
) -> Path:
    """Write the demo GGUF to `path` atomically (temporary file, then rename) and return `path`.

    `size` picks a shape from SIZES; the other keywords override single hyperparameters.
    `pooling` ("mean", "cls" or "last") declares it an embedding model pooled that way.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    overrides = {
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "n_ff": n_ff,
        "context_length": context_length,
    }
    shape = replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise ValueError(f"n_embd must be a multiple of n_head, and n_head of n_head_kv: {shape}")
    tokens, scores, types = demo_vocab()
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    n_embd_kv = head_dim * shape.n_head_kv
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        # Scaled so activations keep unit variance through the layers.
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(shape.n_embd, dtype=np.float32)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    # No timestamps or paths go into the file: the same arguments give the same bytes.
    writer.add_name(NAME)
    writer.add_description(f"random weights, seed {seed}, {shape}; generated by llamafleet")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("t5")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(False)

    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, shape.n_embd))

    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: write the demo model to the given path."""
    parser = argparse.ArgumentParser(
        prog="python -m llamafleet.demo_model",
        description="Generate llamafleet's demo GGUF: llama architecture, random weights from a fixed seed, "
        "a valid-UTF-8 vocabulary. The same arguments always give the same bytes.",
    )
    parser.add_argument("output", type=Path, help="where to write the .gguf")
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="tiny",
        help="tiny (~0.25 MB, tests and demo) or bench (~63 MB, prefill-bound benchmarks); default: tiny",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls", "last"),
        default=None,
        help="make it an embedding model that pools its tokens this way (served by /v1/embeddings)",
    )
    args = parser.parse_args(argv)
    path = write_demo_model(args.output, seed=args.seed, size=args.size, pooling=args.pooling)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
