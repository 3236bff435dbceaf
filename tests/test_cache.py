import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.models.cache import CACHE_ENV, build_once, cache_dir


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == Path.home() / ".cache" / "fedlora"


def test_build_once_builds_once_and_a_failure_leaves_nothing(tmp_path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights").write_text("w")

    target = tmp_path / "model"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert not calls[0].exists()  # the temporary folder was renamed, not copied

    def broken(folder: Path) -> None:
        (folder / "half").write_text("h")
        raise RuntimeError("disk full")

    stale = tmp_path / ".other.x1y2.tmp"  # left by a process killed while building
    stale.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        build_once(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", ".other.lock", "model"]


# Each process records that it built, waits so that the others arrive meanwhile, then writes.
RACER = """
import sys, time
from pathlib import Path
from fedlora.models.cache import build_once

def build(folder):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(0.5)
    (folder / "weights").write_text("w")

print(build_once(Path(sys.argv[1]), build))
"""


def test_concurrent_processes_build_once_and_all_see_the_whole_folder(tmp_path):
    target, log = tmp_path / "model", tmp_path / "log"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(target), str(log)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [r.communicate(timeout=60)[0].strip() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert outputs == [str(target)] * 3
    assert log.read_text() == "built\n"
    assert (target / "weights").read_text() == "w"
