import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zfnet.core.errors import ZfnetError
from zfnet.core.results import (
    atomic_path,
    json_text,
    load_tensors,
    read_json,
    remove_stale_temporaries,
    save_npz,
    write_json,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_json_is_strict_nan_and_inf_become_null_with_a_warning(tmp_path, capsys):
    obj = {"prob": float("nan"), "rows": np.array([[1.0, np.inf], [2.0, -np.inf]]), "t": torch.tensor([0.5]),
           "ok": np.float32(2.5), "n": [1, True, None, "x"]}
    p = write_json(tmp_path / "r.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "prob": None, "rows": [[1.0, None], [2.0, None]], "t": [0.5], "ok": 2.5, "n": [1, True, None, "x"]}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zfnet: warning:" in err and "3 non-finite" in err and "r.json" in err
    assert "prob" in err  # the first place, named
    assert json_text({"a": 1.0}) == '{\n "a": 1.0\n}' and capsys.readouterr().err == ""


@pytest.mark.parametrize("content, reason", [(b"", "is empty"), (b"PK\x03\x04", "cannot read weights file"),
                                            (b"\x80\x02", "cannot read weights file")])
def test_load_tensors_names_the_file_for_empty_and_truncated_files(tmp_path, content, reason):
    p = tmp_path / "w.pth"
    p.write_bytes(content)
    with pytest.raises(ZfnetError, match=reason) as e:
        load_tensors(p, "weights file")
    assert str(p) in str(e.value) and "\n" not in str(e.value) and not str(e.value).endswith(": ")
    # a truncated real file: torch.load raises an error whose text may be empty (EOFError())
    torch.save({"w": torch.ones(1000)}, p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ZfnetError, match="cannot read weights file .*w.pth: .+"):
        load_tensors(p, "weights file")
    with pytest.raises(ZfnetError, match="is a folder"):
        load_tensors(tmp_path, "weights file")


_KILLED_WRITER = """
import os, signal, sys
from zfnet.core.results import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    open(tmp, "w").write("half of a result")
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between writing and replacing
"""


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "run"
    write_json(out / "result.json", {"v": 1})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out / "result.json")], env=env)
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(out) if n != "result.json"]
    assert len(left) == 1 and left[0].startswith(".result.json.")  # what a kill -9 leaves today
    assert read_json(out / "result.json") == {"v": 1}  # the old result is intact
    # the next run (a fresh process) removes it on its first write into that folder
    r = subprocess.run([sys.executable, "-c", "import sys; from zfnet.core.results import write_json; "
                        "write_json(sys.argv[1], {'v': 2})", str(out / "other.json")], env=env)
    assert r.returncode == 0
    assert sorted(os.listdir(out)) == ["other.json", "result.json"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom zfnet.core.results import atomic_path\n"
                               "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'w').write('slow')\n"
                               "    print('writing', flush=True)\n    sys.stdin.readline()\n",
                               str(tmp_path / "slow.txt")], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        assert remove_stale_temporaries(tmp_path) == []  # its writer is alive
        assert len(os.listdir(tmp_path)) == 1
    finally:
        writer.communicate("go\n", timeout=60)
    assert writer.returncode == 0 and os.listdir(tmp_path) == ["slow.txt"]
    assert (tmp_path / "slow.txt").read_text() == "slow"
