"""hift_ext.outputs: default run directory, output path checks, and --overwrite removing only
hift-ext's own files."""
import datetime
import os

import pytest

from hift_ext.errors import UsageError
from hift_ext.outputs import check_output_path, default_run_dir, is_own_output, prepare_output


def test_default_run_dir_is_new_and_readable(tmp_path):
    now = datetime.datetime(2026, 12, 1, 14, 30, 5)
    root = str(tmp_path / "runs")
    a = default_run_dir("all-MiniLM-L6-v2", "hift", root=root, now=now)
    assert a == os.path.join(root, "all-MiniLM-L6-v2-hift-20261201-143005")
    os.makedirs(a)
    assert default_run_dir("all-MiniLM-L6-v2", "hift", root=root, now=now) == a + "-2"
    assert os.path.basename(default_run_dir("my model/..", "full", root=root, now=now)).startswith("my_model")


def test_own_outputs_are_recognised_by_name():
    for name in ("config.json", "metrics.jsonl", "metrics.json", "loss.png", "model", "checkpoint",
                 "checkpoint-12", "checkpoint-12-2", ".hift-model-1a2b.tmp", "checkpoint.tmp"):
        assert is_own_output(name), name
    for name in ("train.tsv", "notes.txt", "checkpoint-best", "model.bin", ".hift-x"):
        assert not is_own_output(name), name


def test_output_under_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_output_path(str(f / "run"))
    with pytest.raises(UsageError, match="not a directory"):
        check_output_path(str(f))
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(UsageError, match="permission denied"):
            check_output_path(str(ro / "run"))


def test_overwrite_removes_only_own_entries(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "checkpoint-3").mkdir()
    os.symlink("checkpoint-3", out / "checkpoint")
    for name in ("config.json", "metrics.jsonl", "notes.txt", "train.tsv"):
        (out / name).write_text("x")
    logs = []
    with pytest.raises(UsageError, match="--overwrite"):
        prepare_output(str(out), overwrite=False, resuming_here=False, inputs=[], log=logs.append)
    prepare_output(str(out), overwrite=True, resuming_here=False, inputs=[str(out / "train.tsv")],
                   log=logs.append)
    assert sorted(os.listdir(out)) == ["notes.txt", "train.tsv"]
    assert "kept 2 other file(s)" in logs[0]


def test_overwrite_refuses_to_delete_an_input(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="holds the input"):
        prepare_output(str(out), overwrite=True, resuming_here=False, inputs=[str(out / "model")],
                       log=print)
    assert (out / "model" / "config.json").exists()


def test_resuming_in_place_needs_no_overwrite_and_removes_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("x")
    prepare_output(str(out), overwrite=False, resuming_here=True, inputs=[], log=print)
    assert os.listdir(out) == ["metrics.jsonl"]
    new = tmp_path / "a" / "b"
    prepare_output(str(new), overwrite=False, resuming_here=False, inputs=[], log=print)
    assert new.is_dir()
