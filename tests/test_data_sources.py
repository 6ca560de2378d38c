"""Reading sources in pieces: every piece type read in order gives load_records; the cache reads a
folder of mixed shards in its workers and equals the in-memory pipeline."""

import gzip
import json

import numpy as np
import pytest
from test_data_cache import SETTINGS, bpe, same_examples  # noqa: F401 (bpe: a fixture)

from jft.data import DataError, load_records, tokenize_records
from jft.data.cache import build_cache
from jft.data.sources import Piece, head_records, pieces, read_piece

WORDS = "the a small black dog cat is was walking sleeping today here and blue flowers".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .jsonl, .txt, .jsonl.gz, .txt.gz and a parquet file of 4 row groups, with blank lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": t}) for t in sentences(60, 0)]
    lines[7] = lines[19] = ""  # blank lines: skipped, numbering kept
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "b.txt").write_text("\r\n".join(sentences(50, 1)) + "\n\n\n" + "a last line without newline")
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"prompt": t, "completion": " ok."}) + "\n" for t in sentences(20, 2)))
    with gzip.open(root / "d.txt.gz", "wt") as f:
        f.write("\n".join(sentences(15, 3)))
    pq.write_table(pa.table({"text": sentences(40, 4)}), root / "e.parquet", row_group_size=10)
    (root / ".hidden.jsonl").write_text("not json\n")
    (root / "notes.md").write_text("not data\n")
    return root


@pytest.mark.parametrize("piece_bytes", [1, 97, 1 << 20])
def test_pieces_in_order_give_load_records(corpus, piece_bytes):
    want = load_records(corpus)
    got_pieces = pieces(corpus, piece_bytes=piece_bytes)
    assert [pair for p in got_pieces for pair in read_piece(p)] == want
    if piece_bytes == 97:  # cut: several pieces per line file and per parquet file
        assert sum(p.path.endswith("a.jsonl") for p in got_pieces) > 3
        assert sum(p.path.endswith("e.parquet") for p in got_pieces) > 1
    assert len(want) == 58 + 51 + 20 + 15 + 40
    where = dict(want)
    assert f"{corpus / 'a.jsonl'}:8" not in where and where[f"{corpus / 'a.jsonl'}:9"]["text"]
    assert where[f"{corpus / 'b.txt'}:53"] == {"text": "a last line without newline"}
    assert where[f"{corpus / 'b.txt'}:1"]["text"].endswith(".")  # \r\n stripped
    assert f"{corpus / 'e.parquet'} row 40" in where


def test_documents_gz_and_errors(corpus, tmp_path):
    docs = load_records(corpus / "b.txt", text_unit="document")
    assert len(docs) == 1 and docs[0][1]["text"] == (corpus / "b.txt").read_bytes().decode()
    assert [p.size for p in pieces(corpus / "d.txt.gz", piece_bytes=1)] == [(corpus / "d.txt.gz").stat().st_size]
    assert len(head_records(corpus, 70)) == 70 and head_records(corpus, 3) == load_records(corpus)[:3]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="text_unit='page'"):
        pieces(corpus, text_unit="page")
    with pytest.raises(DataError, match=r"unsupported file type '\.md'"):
        load_records(corpus / "notes.md")
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "ok"}\n[1]\n')
    with pytest.raises(DataError, match=r"g\.jsonl\.gz:2: record is a list"):
        list(read_piece(Piece(str(gz))))


def test_cache_workers_read_the_pieces_themselves(tmp_path, corpus, bpe):  # noqa: F811
    pairs = load_records(corpus)
    want, stats = tokenize_records(pairs, bpe, **SETTINGS)
    cache = build_cache(corpus, bpe, cache_root=tmp_path, piece_bytes=200, num_proc=2, shard_tokens=500, **SETTINGS)
    assert cache.stats == stats and len(cache.manifest["shards"]) > 2
    same_examples(cache.examples(), want)
    one = build_cache(corpus, bpe, cache_root=tmp_path / "one", piece_bytes=200, shard_tokens=500, **SETTINGS)
    assert one.folder.name == cache.folder.name  # num_proc changes nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"a\.txt: no records"):
        build_cache(empty, bpe, cache_root=tmp_path / "e", **SETTINGS)
