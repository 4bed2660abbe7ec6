"""hift_ext.atomic_io: outputs are new files renamed into place, never written through a link."""
import hashlib
import os

import pytest

from hift_ext.atomic_io import (
    HashingWriter,
    atomic_file,
    install_dir,
    install_symlink,
    is_own_temp,
    make_temp_dir,
    write_text,
)


def test_write_replaces_a_planted_symlink_not_its_target(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "config.json")
    write_text(str(run / "config.json"), "{}")
    assert outside.read_text() == "precious"
    assert not os.path.islink(run / "config.json") and (run / "config.json").read_text() == "{}"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(p)) as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_keep_open_appends_to_the_file_it_created(tmp_path):
    p = tmp_path / "log.jsonl"
    with atomic_file(str(p), keep_open=True) as fh:
        fh.write("a\n")
    fh.write("b\n")
    fh.close()
    assert p.read_text() == "a\nb\n"


def test_install_dir_over_symlink_real_dir_and_file(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.bin").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "model")
    for _ in range(2):  # first over the link, then over the real directory it left
        new = make_temp_dir(str(run), "model")
        assert is_own_temp(os.path.basename(new))
        with open(os.path.join(new, "config.json"), "w") as fh:
            fh.write("{}")
        install_dir(new, str(run / "model"))
        assert not os.path.islink(run / "model") and (run / "model" / "config.json").exists()
        assert sorted(os.listdir(run)) == ["model"]
    assert sorted(os.listdir(target)) == ["keep.bin"]


def test_install_symlink_is_a_rename(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    install_symlink("a", str(tmp_path / "ptr"))
    assert os.readlink(tmp_path / "ptr") == "a"
    install_symlink("b", str(tmp_path / "ptr"))
    assert os.readlink(tmp_path / "ptr") == "b"
    (tmp_path / "real").mkdir()  # a copied run has a real directory where the link was
    install_symlink("a", str(tmp_path / "real"))
    assert os.readlink(tmp_path / "real") == "a"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "ptr", "real"]


def test_hashing_writer(tmp_path):
    p = tmp_path / "f.bin"
    with open(p, "wb") as fh:
        w = HashingWriter(fh)
        w.write(b"hello ")
        w.write(memoryview(b"world"))
    assert w.size == 11 and w.hexdigest() == hashlib.sha256(b"hello world").hexdigest()
