"""hift_ext.checkpoint: atomic checkpoints, verified by their manifest, loaded without unpickling.

A kill at each point of a save is simulated by leaving that point's state on disk.
"""
import json
import os
import pickle
import random
import shutil

import pytest
import torch

from hift_ext import checkpoint as ckpt
from hift_ext.atomic_io import sha256_file
from hift_ext.errors import NonFiniteTrainingError, UsageError


def _save(run, step, weight=1.0, history=()):
    os.makedirs(run, exist_ok=True)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    js, tensors = ckpt.rng_state()
    state = {"config": {"lr": 0.1}, "epoch": 0, "micro": step, "step": step, "counters": {"skipped_steps": 0},
             "rng": js, "data": {}}
    return ckpt.save_checkpoint(str(run), step=step, model_state=model.state_dict(),
                                tensors={"optimizer": opt.state_dict(), "rng": tensors}, state=state,
                                history=list(history))


class Marker:
    """Unpickling this writes a marker file: proof that a load ran code from the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_round_trip_and_layout(tmp_path):
    path = _save(tmp_path, 4, history=['{"type": "train", "step": 2}\n'])
    assert os.path.basename(path) == "checkpoint-4" and os.readlink(tmp_path / "checkpoint") == "checkpoint-4"
    ck = ckpt.open_checkpoint(str(tmp_path))
    assert ck.path.endswith("checkpoint-4") and ck.step == 4 and ck.config == {"lr": 0.1}
    assert ck.history() == ['{"type": "train", "step": 2}\n'] and ck.note is None
    model_state, tensors = ck.load_tensors("cpu")
    assert torch.equal(model_state["weight"], torch.full((2, 3), 1.0) - 0.1)
    assert "momentum_buffer" in tensors["optimizer"]["state"][0]
    # --resume RUN/checkpoint and RUN/checkpoint-4 name the same run
    for p in (tmp_path / "checkpoint", tmp_path / "checkpoint-4"):
        assert os.path.realpath(ckpt.open_checkpoint(str(p)).run_dir) == os.path.realpath(tmp_path)


def test_a_new_checkpoint_replaces_the_old_one(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-4"]
    _save(tmp_path, 4, weight=2.0)  # the same step again (stop after an epoch-end save): a new name
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-4-2"]
    assert ckpt.open_checkpoint(str(tmp_path)).load_tensors("cpu")[0]["weight"][0, 0] == 1.9


def test_rng_state_round_trips_through_json():
    js, tensors = ckpt.rng_state()
    js = json.loads(json.dumps(js, allow_nan=False))
    a = (random.random(), torch.rand(3))
    random.seed(123)
    torch.manual_seed(123)
    ckpt.set_rng_state(js, tensors)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


@pytest.mark.parametrize("legacy", [True, False])
def test_a_planted_pickle_is_never_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    if legacy:  # the layout of hift-ext < format 2: checkpoint/trainer_state.pt, a full pickle
        (run / "checkpoint").mkdir(parents=True)
        torch.save({"config": {}, "x": Marker(str(marker))}, run / "checkpoint" / "trainer_state.pt")
        torch.save({}, run / "checkpoint" / "model.pt")
    else:  # a current checkpoint whose tensors file was swapped, manifest forged to match
        path = _save(run, 2)
        evil = os.path.join(path, ckpt.TENSORS_FILE)
        with open(evil, "wb") as fh:
            pickle.dump({"optimizer": Marker(str(marker))}, fh, protocol=2)
        man = json.load(open(os.path.join(path, ckpt.MANIFEST_FILE)))
        man["files"][ckpt.TENSORS_FILE] = {"size": os.path.getsize(evil),
                                           "sha256": sha256_file(evil)}
        json.dump(man, open(os.path.join(path, ckpt.MANIFEST_FILE), "w"))
    with pytest.raises(UsageError) as e:
        ck = ckpt.open_checkpoint(str(run))
        ck.load_tensors("cpu")
    assert not marker.exists()
    assert ("older hift-ext" in str(e.value)) if legacy else ("cannot be loaded safely" in str(e.value))


@pytest.mark.parametrize("damage,words", [
    ("missing", "model.pt is missing"),
    ("empty", "model.pt is empty"),
    ("truncated", "model.pt is truncated"),
    ("altered", "does not match its manifest"),
    ("no_manifest", "incomplete"),
])
def test_damaged_checkpoint_is_a_clear_usage_error(tmp_path, damage, words):
    path = _save(tmp_path, 3)
    model = os.path.join(path, ckpt.MODEL_FILE)
    if damage == "missing":
        os.remove(model)
    elif damage == "empty":
        open(model, "wb").close()
    elif damage == "truncated":
        data = open(model, "rb").read()
        open(model, "wb").write(data[: len(data) // 2])
    elif damage == "altered":
        data = bytearray(open(model, "rb").read())
        data[-40] ^= 0xFF
        open(model, "wb").write(bytes(data))
    else:
        os.remove(os.path.join(path, ckpt.MANIFEST_FILE))
    with pytest.raises(UsageError, match=words):
        ckpt.open_checkpoint(str(tmp_path))


def test_kill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 2)
    # killed mid-save: a temporary directory with part of the files, the pointer untouched
    tmp = tmp_path / ".hift-checkpoint-4-dead.tmp"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert ckpt.open_checkpoint(str(tmp_path)).step == 2
    _save(tmp_path, 4)  # the next save clears the leftover
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-4"]


def test_kill_between_rename_and_pointer_switch(tmp_path):
    _save(tmp_path, 2)
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-4")  # complete, not yet current
    assert ckpt.open_checkpoint(str(tmp_path)).path.endswith("checkpoint-2")


def test_kill_after_the_switch_before_cleanup(tmp_path):
    _save(tmp_path, 2)
    keep = tmp_path / "keep-2"
    shutil.copytree(tmp_path / "checkpoint-2", keep)
    _save(tmp_path, 4)
    shutil.copytree(keep, tmp_path / "checkpoint-2")  # the old one was not deleted yet
    assert ckpt.open_checkpoint(str(tmp_path)).step == 4


def test_without_pointer_the_newest_complete_checkpoint_is_used(tmp_path):
    _save(tmp_path, 2)
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "keep")
    _save(tmp_path, 4)
    os.rename(tmp_path / "keep", tmp_path / "checkpoint-2")
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-6")
    os.remove(tmp_path / "checkpoint-6" / ckpt.MANIFEST_FILE)  # incomplete: killed while saving
    os.remove(tmp_path / "checkpoint")
    ck = ckpt.open_checkpoint(str(tmp_path))
    assert ck.path.endswith("checkpoint-4") and "newest complete" in ck.note
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.rmtree(tmp_path / name)
    with pytest.raises(UsageError, match="no complete checkpoint.*checkpoint-6 is incomplete"):
        ckpt.open_checkpoint(str(tmp_path))


def test_a_pointer_leading_elsewhere_is_refused(tmp_path):
    other = tmp_path / "other"
    _save(other, 2)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(other / "checkpoint-2", run / "checkpoint")
    with pytest.raises(UsageError, match="not to a checkpoint of this directory"):
        ckpt.open_checkpoint(str(run))


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    _save(tmp_path, 2)
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):
        _save(tmp_path, 4, weight=float("nan"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-2"]


def test_data_fingerprints(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("a\t1\n")
    saved = {"train": ckpt.file_fingerprint(str(p)), "eval": None}
    assert ckpt.changed_data_files(saved, {"train": str(p), "eval": None}) == []
    p.write_text("a\t0\n")  # same size, other content
    [msg] = ckpt.changed_data_files(saved, {"train": str(p), "eval": None})
    assert "train.tsv changed since the run started" in msg
    os.remove(p)
    assert "cannot read" in ckpt.changed_data_files(saved, {"train": str(p)})[0]
