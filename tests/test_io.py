"""Result files are written atomically: a failed write leaves the old file whole."""

import json
import os
import stat

import numpy as np
import pytest

from cpjax.io import atomic_path, save_npy, write_json


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(str(path), ".json") as tmp:
            with open(tmp, "w") as f:
                f.write('{"a": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_npy(str(tmp_path / "x.npy"), np.arange(3))
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "x.npy").st_mode)
    assert mode == 0o644
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
