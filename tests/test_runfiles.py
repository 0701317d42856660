"""Atomic writes: a file or directory under its final name is whole, and a failed write leaves no debris.

The write that fails midway on a full disk, and the adapter saved under a temporary name, are in
test_reliability.py.
"""

import os

import pytest

from mathtune.runfiles import write_bytes, write_dir, write_text


def test_write_bytes_puts_the_content_under_the_name_and_nothing_beside_it(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    write_bytes(path, b"\x89PNG first")
    write_bytes(path, b"\x89PNG second")
    assert path.read_bytes() == b"\x89PNG second"
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]


def test_write_text_is_utf8_with_newlines_as_given(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "café\nline\r\n")
    assert path.read_bytes() == "café\nline\r\n".encode("utf-8")


def test_a_write_that_cannot_rename_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_text(path, "old\n")

    def no_rename(source, target):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        write_bytes(path, b"new\n")
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def fills(*names, fail=False):
    """A fill that writes one file per name, then raises when asked to."""
    def fill(folder):
        for name in names:
            (folder / name).write_text(name)
        if fail:
            raise OSError("disk full")
    return fill


def test_write_dir_makes_the_target_appear_whole(tmp_path):
    target = tmp_path / "adapter"
    seen = []

    def fill(folder):
        seen.append((folder.is_dir(), target.exists()))
        fills("a", "b")(folder)

    assert write_dir(target, fill, replace=True) == target
    assert seen == [(True, False)]  # the fill writes into an existing partial directory, not the target
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_dir_with_replace_puts_the_new_directory_in_place_of_the_old(tmp_path):
    target = tmp_path / "adapter"
    write_dir(target, fills("old", "stale"), replace=True)
    write_dir(target, fills("new"), replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_dir_without_replace_keeps_the_first_finished_copy(tmp_path):
    target = tmp_path / "model"
    write_dir(target, fills("first"), replace=False)
    assert write_dir(target, fills("second"), replace=False) == target  # as a second process finishing later
    assert sorted(p.name for p in target.iterdir()) == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("replace", [True, False])
def test_a_fill_that_raises_leaves_no_target_and_no_partial(tmp_path, replace):
    target = tmp_path / "adapter"
    with pytest.raises(OSError, match="disk full"):
        write_dir(target, fills("half", fail=True), replace=replace)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("replace", [True, False])
def test_a_fill_that_raises_keeps_the_old_target(tmp_path, replace):
    target = tmp_path / "adapter"
    write_dir(target, fills("old"), replace=True)
    with pytest.raises(OSError, match="disk full"):
        write_dir(target, fills("half", fail=True), replace=replace)
    assert sorted(p.name for p in target.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_partial_left_by_a_killed_process_with_this_pid_is_cleared_first(tmp_path):
    target = tmp_path / "model"
    leftover = tmp_path / f"model.partial-{os.getpid()}"
    leftover.mkdir()
    (leftover / "torn").write_text("half")
    write_dir(target, fills("whole"), replace=False)
    assert sorted(p.name for p in target.iterdir()) == ["whole"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
