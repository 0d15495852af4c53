"""The warm model of ``slidevl ask``: real commands in new processes, a real background server on a real socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from test_ask_latency import slide_checkpoint  # noqa: F401  (fixtures are used by name)
from test_slidellm_fixtures import world  # noqa: F401
from typer.testing import CliRunner

from slidevl.slidellm import ask_warm
from slidevl.slidellm.ask_cli import app as ask_app

runner = CliRunner()


def _servers_of(cache: Path) -> list[int]:
    """Pids of the warm servers started for ``cache`` (from their command lines)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ask_warm.SERVER_MODULE.encode() in argv and str(cache.resolve()).encode() in argv:
            pids.append(int(proc.name))
    return pids


@pytest.fixture()
def cache(tmp_path: Path) -> Iterator[Path]:
    """A cache folder; every server started for it is killed at the end."""
    folder = tmp_path / "cache"
    yield folder
    for pid in _servers_of(folder):
        os.kill(pid, signal.SIGKILL)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (ask_warm.ENV_KEEP_WARM, ask_warm.ENV_IDLE)}


def _ask(argv: list[str], *python_options: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``slidevl ask ARGV`` in a new process."""
    return subprocess.run([sys.executable, *python_options, "-m", "slidevl", "ask", *argv], capture_output=True, text=True,
                          env=_env(), cwd=cwd)


def _started(stderr: str) -> int:
    found = re.findall(r"keeping the model loaded for the next ask: pid (\d+)", stderr)
    assert len(found) == 1, stderr
    return int(found[0])


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 300
    while ask_warm.alive(pid):
        assert time.monotonic() < deadline, f"warm server {pid} still runs"
        time.sleep(0.1)


def _question(slide: Path, checkpoint: Path, cache: Path) -> list[str]:
    return [str(slide), "Describe the slide.", "--checkpoint", str(checkpoint), "--cache", str(cache),
            "--max-new-tokens", "3", "--device", "cpu"]


def test_the_first_ask_leaves_a_warm_model_that_answers_the_next(slide_checkpoint: tuple[Path, Path],  # noqa: F811
                                                                 cache: Path) -> None:
    from slidevl.slidellm.model import SlideVLMError, parse_bbox

    slide, checkpoint = slide_checkpoint
    ask = _question(slide, checkpoint, cache)
    here = runner.invoke(ask_app, [*ask, "--no-keep-warm"])  # answered in this process: the reference
    assert here.exit_code == 0, here.output
    assert not (cache / "warm").exists() and not _servers_of(cache)  # --no-keep-warm starts none

    # A dead server's socket is left behind: nothing answers there, and it is replaced.
    warm = ask_warm.target(checkpoint, "cpu", cache)
    assert warm is not None
    warm.folder.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead, ask_warm.unix_address(warm.socket) as address:
        dead.bind(address)
    assert warm.socket.exists() and ask_warm.ping(warm.socket) is None

    first = _ask(ask)
    assert first.returncode == 0, first.stderr
    assert first.stdout == here.stdout
    pid = _started(first.stderr)
    for said in (f"socket {warm.socket}", "exits after 10 min", "--no-keep-warm", ask_warm.ENV_KEEP_WARM, "--stop-warm"):
        assert said in first.stderr, said
    running = ask_warm.ping(warm.socket)
    assert running is not None and running["pid"] == pid and running["key"] == warm.key
    assert _servers_of(cache) == [pid]
    assert stat.S_IMODE(warm.socket.stat().st_mode) == 0o600 and stat.S_IMODE(warm.folder.stat().st_mode) == 0o700

    second = _ask(ask, "-X", "importtime")
    assert second.returncode == 0, second.stderr
    assert second.stdout == here.stdout
    assert f"answered by the warm model (pid {pid})" in second.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert "slidevl.slidellm.ask_warm" in imported
    assert not imported & {"torch", "transformers", "peft", "numpy"}  # the asking process imports nothing heavy

    # A new slide file is preprocessed by the warm model, and its progress reaches the asking command.
    from slide_fixtures import write_aperio_slide

    other = write_aperio_slide(slide.parent / "other.svs", 1536, 1024, seed=5)
    new_slide = _ask([str(other), *ask[1:]])
    assert new_slide.returncode == 0, new_slide.stderr
    assert f"preprocess: 1 slide(s) -> {cache}" in new_slide.stderr, new_slide.stderr
    assert f"answered by the warm model (pid {pid})" in new_slide.stderr

    # Errors met by the warm model read as in this process, with the same exit code.
    with pytest.raises(SlideVLMError) as bad_box:
        parse_bbox("1,2,3")
    wrong = _ask([*ask, "--bbox", "1,2,3"])
    assert (wrong.returncode, wrong.stderr) == (2, f"error: {bad_box.value}\n")
    unknown_here = runner.invoke(ask_app, ["no-such-slide", *ask[1:]], env={ask_warm.ENV_KEEP_WARM: "0"})
    unknown = _ask(["no-such-slide", *ask[1:]])
    assert unknown_here.exit_code == 2 and unknown_here.stderr.startswith("error: no-such-slide: ")
    assert (unknown.returncode, unknown.stderr) == (2, unknown_here.stderr)
    assert ask_warm.ping(warm.socket)["pid"] == pid  # still there for the next question
    assert _servers_of(cache) == [pid]  # and the one answered here with SLIDEVL_ASK_KEEP_WARM=0 started none

    stop = _ask(["--stop-warm", "--cache", str(cache)])
    assert stop.returncode == 0 and f"stopped the warm model pid {pid}" in stop.stderr
    assert not ask_warm.alive(pid) and not warm.socket.exists() and not warm.info.exists()
    assert "no warm model runs" in _ask(["--stop-warm", "--cache", str(cache)]).stderr


@pytest.mark.slow
def test_a_changed_checkpoint_is_not_served_by_the_old_model_and_an_idle_one_exits(
        slide_checkpoint: tuple[Path, Path], cache: Path) -> None:  # noqa: F811
    slide, checkpoint = slide_checkpoint
    ask = _question(slide, checkpoint, cache)
    first = _ask(ask)
    assert first.returncode == 0, first.stderr
    old = _started(first.stderr)

    # Retraining rewrites the checkpoint's files; a newer mtime is what the key sees.
    info = next(checkpoint.rglob("config.json"))
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 10**9))
    second = _ask([*ask, "--warm-idle", "5"])
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    new = _started(second.stderr)
    assert new != old and "answered by the warm model" not in second.stderr
    _wait_gone(old)  # the old model stepped down when it saw the new key
    warm = ask_warm.target(checkpoint, "cpu", cache)
    assert warm is not None and ask_warm.ping(warm.socket)["key"] == warm.key

    _wait_gone(new)  # 5 s without a question: it exits by itself, and cleans up
    assert not warm.socket.exists() and not warm.info.exists() and not _servers_of(cache)


@pytest.mark.slow
def test_two_first_asks_at_once_start_one_warm_model(slide_checkpoint: tuple[Path, Path], cache: Path) -> None:  # noqa: F811
    slide, checkpoint = slide_checkpoint
    ask = _question(slide, checkpoint, cache)
    argv = [sys.executable, "-m", "slidevl", "ask", *ask]
    both = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    outputs = [p.communicate() for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    started = [_started(err) for _, err in outputs if "keeping the model loaded" in err]
    assert len(started) == 1, outputs
    assert _servers_of(cache) == started


@pytest.mark.slow
def test_a_checkpoint_the_warm_model_cannot_load_fails_as_it_does_in_process(tmp_path: Path, cache: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not_a_run").mkdir()
    ask = ["slide-1", "Describe the slide.", "--checkpoint", "not_a_run", "--cache", str(cache), "--device", "cpu"]
    monkeypatch.chdir(tmp_path)  # the checkpoint is given relative to the command's folder, as it is named in the error
    here = runner.invoke(ask_app, [*ask, "--no-keep-warm"])
    assert here.exit_code == 2 and here.stderr.startswith("error: not_a_run: "), here.output
    there = _ask(ask, cwd=tmp_path)
    assert there.returncode == 2 and there.stderr.splitlines()[-1] == here.stderr.strip()
    assert "keeping the model loaded" not in there.stderr  # nothing was kept
    assert not _servers_of(cache)
