"""The demo GGUF: deterministic bytes, a llama architecture, a vocabulary of valid UTF-8 pieces only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from llamafleet.demo_model import NAME, write_demo_model


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_same_arguments_give_identical_bytes_and_other_seeds_do_not(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_demo_model(tmp_path / "a" / "demo.gguf")
    second = write_demo_model(tmp_path / "b" / "other-name.gguf")
    assert first.read_bytes() == second.read_bytes()
    assert write_demo_model(tmp_path / "seed1.gguf", seed=1).read_bytes() != first.read_bytes()
    assert first.stat().st_size < 5_000_000
    # Written through a temporary file that does not stay behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["demo.gguf"]


def test_reads_back_as_a_llama_model_with_a_utf8_vocabulary_and_no_byte_tokens(demo_model: Path) -> None:
    reader = gguf.GGUFReader(demo_model)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == NAME
    assert field(reader, "tokenizer.ggml.model") == "t5"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == field(reader, "llama.vocab_size")
    assert len(set(tokens)) == len(tokens)
    assert not [t for t in tokens if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)]
    assert gguf.TokenType.BYTE not in types
    for token in tokens:
        token.encode("utf-8")  # a lone surrogate (not UTF-8) would raise
    unk, bos, eos = (field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos"))
    assert (tokens[unk], tokens[bos], tokens[eos]) == ("<unk>", "<s>", "</s>")
    assert types[unk] == gguf.TokenType.UNKNOWN and types[bos] == types[eos] == gguf.TokenType.CONTROL
    assert {"▁the", "▁hello", "▁world", "a", "\n", "▁"} <= set(tokens)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert field(reader, "llama.block_count") == 2


def test_shape_overrides_and_bad_sizes(tmp_path: Path) -> None:
    path = write_demo_model(tmp_path / "one.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1)
    reader = gguf.GGUFReader(path)
    assert field(reader, "llama.block_count") == 1 and field(reader, "llama.embedding_length") == 32
    with pytest.raises(ValueError, match="size"):
        write_demo_model(tmp_path / "x.gguf", size="huge")
    with pytest.raises(ValueError, match="multiple"):
        write_demo_model(tmp_path / "x.gguf", n_embd=30, n_head=4)
    assert not (tmp_path / "x.gguf").exists()


def test_command_line_writes_the_same_file(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    subprocess.run([sys.executable, "-m", "llamafleet.demo_model", str(out), "--seed", "3"], check=True, timeout=60)
    assert out.read_bytes() == write_demo_model(tmp_path / "api.gguf", seed=3).read_bytes()
    usage = subprocess.run(
        [sys.executable, "-m", "llamafleet.demo_model", "--help"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 0 and "--size" in usage.stdout and "bench" in usage.stdout


def test_a_pooling_makes_an_embedding_model_that_storage_metadata_shows(tmp_path: Path) -> None:
    from llamafleet.gguf_info import parse_header

    path = write_demo_model(tmp_path / "e.gguf", pooling="last")
    assert field(gguf.GGUFReader(path), "llama.pooling_type") == gguf.PoolingType.LAST
    assert parse_header(path.read_bytes()).metadata()["pooling_type"] == "last"
    assert "pooling_type" not in parse_header(write_demo_model(tmp_path / "g.gguf").read_bytes()).metadata()
