import os
import stat

import numpy as np
import pytest

from zfnet.core.results import atomic_path, read_json, save_npz, write_json


def test_atomic_write_keeps_old_file_on_failure_and_normal_permissions(tmp_path):
    p = tmp_path / "r" / "result.json"
    write_json(p, {"schema": 1, "v": np.float32(2.5)})
    assert read_json(p) == {"schema": 1, "v": 2.5}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    assert read_json(p)["v"] == 2.5 and sorted(os.listdir(p.parent)) == ["result.json"]
    save_npz(tmp_path / "a.npz", x=np.arange(3))
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2]
