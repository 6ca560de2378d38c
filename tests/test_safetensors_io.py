"""Safetensors I/O shared by checkpoints, merges and adapters: sizes, shard plans, atomic writes."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from jft import safetensors_io as sio


def test_sizes_and_shard_plans():
    assert sio.parse_size("5GB") == 5 * 10**9 and sio.parse_size("2GiB") == 2 * 2**30 and sio.parse_size(7) == 7
    with pytest.raises(ValueError, match="use bytes or e.g. '5GB'"):
        sio.parse_size("five")
    assert sio.plan_shards([4, 4, 4, 9, 1], limit=8) == [[0, 1], [2], [3], [4]]  # an oversized tensor alone
    assert sio.shard_names(1) == ["model.safetensors"]
    assert sio.shard_names(3)[1] == "model-00002-of-00003.safetensors"


def test_shard_writer_streams_shards_with_an_index_that_weight_map_reads(tmp_path):
    tensors = {f"t{i}": np.full((4, 8), i, np.float32) for i in range(3)}
    writer = sio.ShardWriter(tmp_path, 200, [(n, x.shape, x.dtype) for n, x in tensors.items()])
    for name, x in tensors.items():
        writer.add(name, x)
    writer.close()
    files = sio.weight_map(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*sio.shard_names(3), "model.safetensors.index.json"])
    for name, x in tensors.items():
        np.testing.assert_array_equal(load_file(files[name])[name], x)
        start, header = sio.read_header(files[name])
        assert header[name]["dtype"] == "F32" and header[name]["shape"] == [4, 8] and start % 8 == 0


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "data.npz"
    sio.atomic_write(target, lambda tmp: np.savez(tmp, x=np.arange(3)))  # the suffix is kept: savez adds none
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sio.atomic_write(target, fail)
    assert [p.name for p in tmp_path.iterdir()] == ["data.npz"]  # the old file, no temporary one
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))
    sio.atomic_write(tmp_path / "folder", lambda tmp: (tmp.mkdir(), (tmp / "a.txt").write_text("a")))
    assert (tmp_path / "folder" / "a.txt").read_text() == "a"


def test_whole_files_round_trip_and_a_truncated_one_is_named(tmp_path):
    import ml_dtypes

    tensors = {"a/b": np.arange(6, dtype=np.float32).reshape(2, 3), "c": np.ones(4, ml_dtypes.bfloat16)}
    file = tmp_path / "adapter.safetensors"
    sio.write_tensors(file, tensors)
    back = sio.read_tensors(file)
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert back["c"].dtype == ml_dtypes.bfloat16
    file.write_bytes(file.read_bytes()[:-5])
    with pytest.raises(sio.CheckpointError, match=r"adapter\.safetensors: not a readable safetensors file"):
        sio.read_tensors(file)
