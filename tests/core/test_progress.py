"""Progress on stderr: plain lines (phase, n/N, rate, ETA) where stderr is not a terminal, nothing when
disabled, never on stdout."""

import re

from zfnet.core.progress import format_seconds, progress_bar


def test_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("ZFNET_PROGRESS_INTERVAL", "0")
    bar = progress_bar(total=4, desc="mine", unit="img")
    for _ in range(4):
        bar.update(1)
    bar.set_postfix_str("features.3")
    bar.close()
    bar.close()  # twice: one final line
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 4  # 1/4, 2/4, 3/4, then the final line (4/4 is not printed twice)
    assert re.fullmatch(r"zfnet: mine 1/4 img \(25%\), [\d.e+]+ img/s, ETA \d+:\d\d", lines[0])
    assert re.fullmatch(r"zfnet: mine 4/4 img \(100%\), [\d.e+]+ img/s in \d+:\d\d \[features.3\]", lines[-1])


def test_lines_are_rate_limited_and_iteration_works(capsys, monkeypatch):
    monkeypatch.setenv("ZFNET_PROGRESS_INTERVAL", "3600")
    assert list(progress_bar(range(5), desc="decode")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("zfnet: decode 5/5 it (100%)")
    with progress_bar(total=None, desc="steps") as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
    assert re.fullmatch(r"zfnet: steps 2 it, [\d.e+]+ it/s in 0:00 \[loss=0.5\]", capsys.readouterr().err.strip())


def test_disabled_prints_nothing(capsys):
    bar = progress_bar(total=3, desc="x", enabled=False)
    bar.update(3)
    bar.close()
    assert list(progress_bar([1, 2], enabled=False)) == [1, 2]
    assert capsys.readouterr() == ("", "")


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 7.4, 205, 3723)] == ["0:00", "0:07", "3:25", "1:02:03"]
