"""Checkpoint files: atomic writes, RNG states, meta checks."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from advent_fast import checkpoint as ckpt_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_save_and_load_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pt")
    state = {"format": ckpt_io.FORMAT, "meta": {"arch": "a"}, "model": {"w": torch.arange(3.0)}}
    ckpt_io.save_atomic(state, path)
    loaded = ckpt_io.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]  # no temporary left behind


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="not found"):
        ckpt_io.load(str(tmp_path / "missing.pt"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not an advent_fast/1 checkpoint"):
        ckpt_io.load(str(tmp_path / "plain.pt"))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ckpt_io.CheckpointError, match="cannot read"):
        ckpt_io.load(str(tmp_path / "junk.pt"))


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "iteration": 1, "model": {"w": torch.ones(4)}}, path)
    # A child process starts overwriting it and is killed (SIGKILL) half-way through the write.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from advent_fast import checkpoint as ckpt_io

        def dying_save(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        ckpt_io.save_atomic({{"format": ckpt_io.FORMAT, "iteration": 2}}, {path!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -9
    survivor = ckpt_io.load(path)
    assert survivor["iteration"] == 1 and torch.equal(survivor["model"]["w"], torch.ones(4))
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".checkpoint.pt.tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary...
    (tmp_path / "other.pt").write_bytes(b"x")
    (tmp_path / ".other.pt.tmp1").write_bytes(b"x")
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "iteration": 3}, path)
    # ...is removed by the next save of the same file, and nothing else is.
    assert sorted(os.listdir(tmp_path)) == [".other.pt.tmp1", "checkpoint.pt", "other.pt"]
    assert ckpt_io.load(path)["iteration"] == 3


def test_rng_state_round_trip():
    state = ckpt_io.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt_io.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_meta_and_resumability_checks():
    ckpt = {"format": ckpt_io.FORMAT, "meta": {"arch": "deeplabv2_small", "num_classes": 19, "multi_level": True}}
    ckpt_io.check_meta(ckpt, {"arch": "deeplabv2_small", "num_classes": 19, "multi_level": True})
    with pytest.raises(ckpt_io.CheckpointError, match="num_classes=19 .this run: 16"):
        ckpt_io.check_meta(ckpt, {"arch": "deeplabv2_small", "num_classes": 16, "multi_level": True})
    with pytest.raises(ckpt_io.CheckpointError, match="arch='deeplabv2_small'"):
        ckpt_io.check_meta(ckpt, {"arch": "deeplabv2_r101", "num_classes": 19, "multi_level": True})
    with pytest.raises(ckpt_io.CheckpointError, match="model snapshot"):
        ckpt_io.check_resumable(ckpt)
