"""Atomic writes: nothing half-written on failure, and what is written is readable as an ordinary file would be."""
import json
import math
import os
import stat

import pytest

from smarttrim_cli.atomic import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_new_files_and_folders_get_the_umask_mode_not_the_temp_files(tmp_path, umask022):
    f = tmp_path / "report.json"
    with atomic_path(f) as tmp:
        tmp.write_text("{}")
    assert f.read_text() == "{}" and mode(f) == 0o644  # mkstemp alone gives 0600: unreadable by a server user

    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        with atomic_path(tmp / "model.safetensors") as t:
            t.write_bytes(b"x")
    assert mode(d) == 0o755 and mode(d / "model.safetensors") == 0o644


def test_an_overwritten_file_keeps_its_mode(tmp_path, umask022):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"old")
    f.chmod(0o640)
    with atomic_path(f) as tmp:
        tmp.write_bytes(b"new")
    assert f.read_bytes() == b"new" and mode(f) == 0o640


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    d = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert f.read_text() == "old" and not d.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_json_strict_refuses_nan_and_keeps_the_old_file(tmp_path):
    f = tmp_path / "out" / "report.json"
    assert write_json(f, {"a": 1.5, "b": [1, 2]}) == f
    assert json.loads(f.read_text()) == {"a": 1.5, "b": [1, 2]} and f.read_text().endswith("\n")
    with pytest.raises(ValueError):
        write_json(f, {"a": math.nan}, allow_nan=False)
    assert json.loads(f.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert sorted(p.name for p in f.parent.iterdir()) == ["report.json"]
    write_json(f, {"a": math.nan})  # training logs may hold a diverged loss
    assert math.isnan(json.loads(f.read_text())["a"])
