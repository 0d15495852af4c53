"""A loaded checkpoint kept warm between ``slidevl ask`` commands: the client side.

A new process pays for importing torch, transformers and peft and loading the checkpoint
before it can answer, ten times the answer itself on CPU. So ``slidevl ask`` hands the
question to a background process (:mod:`slidevl.slidellm.ask_warm_server`) that loaded
the checkpoint once and listens on a Unix socket under the cache folder; the first ask
starts it, later asks from new processes find it. This module is what those later asks
import, so it uses the standard library only: no torch, no transformers.

Under ``<cache>/warm/`` (mode 0700), per checkpoint and device (``NAME`` is a hash of both):

``NAME.sock``  the server's socket (mode 0600), bound once the model is loaded;
``NAME.lock``  locked (``flock``) by whoever is starting the server, until the socket is bound,
               so two asks at once start one server;
``NAME.json``  the server's pid, checkpoint, socket and idle timeout (written atomically;
               also the error when loading the checkpoint failed);
``NAME.log``   the server's own output, for when it fails.

A server answers only requests that carry its key: the checkpoint's resolved path, the
size and mtime of every file under it, the device, the cache and this protocol's version.
A retrained checkpoint changes the key, and the server that loaded the old one steps
down when it sees the new key.

Protocol: the client sends one JSON line; the server replies with JSON lines, any number
of ``{"stderr": text}`` (what the command would print on stderr, e.g. preprocessing
progress) and then one of ``{"answer", "pid"}``, ``{"error", "exit_code", "pid"}`` or
``{"stale": true}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from slidevl import __version__
from slidevl.atomic import write_json_atomic
from slidevl.cpus import OPENMP_WAIT
from slidevl.errors import SlideVLError

PROTOCOL = 1
SERVER_MODULE = "slidevl.slidellm.ask_warm_server"
#: Off switch besides ``--no-keep-warm`` (``0``, ``false``, ``no`` or ``off``).
ENV_KEEP_WARM = "SLIDEVL_ASK_KEEP_WARM"
ENV_IDLE = "SLIDEVL_ASK_WARM_IDLE"
DEFAULT_IDLE_S = 600.0
#: ``slidevl ask --cache``'s default.
DEFAULT_CACHE = Path("~/.cache/slidevl/ask")
#: A checkpoint folder holds a few dozen files; far more means --checkpoint names some other folder.
MAX_CHECKPOINT_FILES = 5000
#: How long an ask waits for a starting server to load the checkpoint before answering by itself.
START_WAIT_S = 600.0
#: For ping and stop, which a live server answers at once unless it is busy with an answer.
QUICK_TIMEOUT_S = 30.0


class WarmError(SlideVLError, RuntimeError):
    """An error met by the warm model, reported with the exit code the command would have given."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Warm:
    """Where the warm server of one checkpoint, device and cache lives, and the key it must hold."""

    #: Resolved, and as the command spelled it (the server loads that spelling, so its errors read the same).
    checkpoint: Path
    checkpoint_arg: str
    device: str | None
    cache: Path
    folder: Path
    name: str
    key: str

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.name}.sock"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.name}.lock"

    @property
    def info(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"


@dataclass(frozen=True)
class Reply:
    answer: str
    pid: int
    #: True when this command started the server (it said so already).
    started: bool


def checkpoint_files(checkpoint: Path, cache: Path) -> list[tuple[str, int, int]] | None:
    """(relative path, size, mtime_ns) of every file under ``checkpoint``; None when it is no folder or far too big.

    Layout-agnostic on purpose: whatever a retraining rewrites changes an mtime. A cache
    folder inside the checkpoint is left out: asking writes there.
    """
    if not checkpoint.is_dir():
        return None
    files = []
    for folder, subfolders, names in os.walk(checkpoint):
        subfolders[:] = sorted(name for name in subfolders if os.path.join(folder, name) != str(cache))
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:  # removed while walking, or a broken link: not part of what loads
                continue
            files.append((os.path.relpath(path, checkpoint), stat.st_size, stat.st_mtime_ns))
            if len(files) > MAX_CHECKPOINT_FILES:
                return None
    return files


def target(checkpoint: str | os.PathLike[str], device: str | None, cache: str | os.PathLike[str]) -> Warm | None:
    """The warm server for these options; None when there cannot be one (no such folder: the command says why)."""
    resolved = Path(checkpoint).expanduser().resolve()
    cache_dir = Path(cache).expanduser().resolve()
    files = checkpoint_files(resolved, cache_dir)
    if files is None:
        return None
    name = hashlib.sha256(json.dumps([str(resolved), device]).encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([PROTOCOL, __version__, str(resolved), device, str(cache_dir), files]).encode()).hexdigest()
    return Warm(resolved, os.fspath(checkpoint), device, cache_dir, cache_dir / "warm", name, key)


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """``path`` as an address that ``bind`` and ``connect`` accept.

    Unix socket paths are limited to 107 bytes; a longer one (a deep cache folder) is
    reached through an open descriptor of its folder (Linux).
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        with unix_address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def exchange(sock: socket.socket, request: dict[str, Any], on_stderr: Callable[[str], Any]) -> dict[str, Any]:
    """Send ``request`` and return the server's final message, passing its stderr output on."""
    send(sock, request)
    with sock.makefile("r", encoding="utf-8") as lines:
        for line in lines:
            message = json.loads(line)
            if "stderr" in message:
                on_stderr(message["stderr"])
                continue
            return message
    raise ConnectionError("the connection closed before a reply")


def ping(path: Path) -> dict[str, Any] | None:
    """What the server on ``path`` says about itself; None when none listens there."""
    try:
        with connect(path, QUICK_TIMEOUT_S) as sock:
            return exchange(sock, {"op": "ping"}, lambda _text: None)
    except (OSError, ValueError):
        return None


def read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _try_lock(fd: int, mode: int, patience_s: float = 0.0) -> bool:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        # A waiting ask probes the lock for a moment; a short retry keeps that probe from stopping a start.
        time.sleep(0.02)


def starting(warm: Warm) -> bool:
    """Whether a server for ``warm`` is being started (its lock is held)."""
    try:
        fd = os.open(warm.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def start(warm: Warm, idle_s: float) -> int | None:
    """Start a server for ``warm`` unless one is running or starting; its pid, or None."""
    warm.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(warm.folder, 0o700)  # sockets, pids and logs of this user only
    fd = os.open(warm.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_lock(fd, fcntl.LOCK_EX, patience_s=0.2):
            return None
        running = ping(warm.socket)
        if running is not None and running.get("key") == warm.key:
            return None
        env = {**OPENMP_WAIT, **os.environ}  # see slidevl.cpus.interactive_openmp
        with open(os.open(warm.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as log:
            # The lock travels with the descriptor: the server holds it until its socket is bound.
            server = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--checkpoint", warm.checkpoint_arg, "--cwd", os.getcwd(),
                 "--cache", str(warm.cache), "--idle", str(idle_s), "--lock-fd", str(fd),
                 *(["--device", warm.device] if warm.device else [])],
                pass_fds=(fd,), start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=warm.folder, env=env,
            )
        return server.pid
    finally:
        os.close(fd)


def wait_for_start(warm: Warm, say: Callable[[str], Any], timeout_s: float = START_WAIT_S) -> bool:
    """Wait while a server for ``warm`` is starting; False when it is still loading after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while starting(warm):
        if time.monotonic() >= deadline:
            say(f"the warm model is still loading after {timeout_s:.0f} s (log: {warm.log}); answering here")
            return False
        time.sleep(0.1)
    return True


def describe_idle(idle_s: float) -> str:
    return f"{idle_s / 60:g} min" if idle_s >= 60 else f"{idle_s:g} s"


def started_notice(warm: Warm, pid: int, idle_s: float) -> str:
    cache = "" if warm.cache == DEFAULT_CACHE.expanduser().resolve() else f" --cache {warm.cache}"
    return (f"keeping the model loaded for the next ask: pid {pid}, socket {warm.socket}; it exits after "
            f"{describe_idle(idle_s)} without questions (--warm-idle). Opt out: --no-keep-warm or {ENV_KEEP_WARM}=0; "
            f"stop it: slidevl ask --stop-warm{cache}")


def ask(warm: Warm, request: dict[str, Any], *, idle_s: float, stderr: TextIO) -> Reply | None:
    """Answer ``request`` through the warm server of ``warm``, starting one when none runs.

    None when no server could answer; the caller then answers in this process (a notice
    says why, unless the old server stepped down for a changed checkpoint, which the
    start notice of the new one tells). An error the server met while answering, or
    while loading the checkpoint, is raised as :class:`WarmError`.
    """
    def say(text: str) -> None:
        stderr.write(text + "\n")
        stderr.flush()

    started: int | None = None
    waited = False
    # Connect; else start a server (or wait for the one starting) and connect again. A server
    # for an older state of the checkpoint steps down, and the loop starts a new one.
    for _ in range(3):
        try:
            sock = connect(warm.socket, QUICK_TIMEOUT_S)
        except (FileNotFoundError, ConnectionRefusedError):  # none, or the socket of a dead server
            if waited:
                say(f"the warm model exited while loading (log: {warm.log}); answering here")
                return None
            if not starting(warm):
                try:
                    started = start(warm, idle_s)
                except OSError as exc:  # e.g. a cache folder this user cannot write
                    say(f"the warm model cannot be started in {warm.folder} ({exc}); answering here")
                    return None
            if not wait_for_start(warm, say):
                return None
            waited = True
            _raise_load_error(warm)
            continue
        except OSError as exc:
            say(f"the warm model at {warm.socket} cannot be reached ({exc}); answering here")
            return None
        with sock:
            sock.settimeout(None)  # an answer takes as long as it takes; Ctrl-C ends the wait
            try:
                reply = exchange(sock, {**request, "op": "ask", "key": warm.key}, stderr.write)
            except (OSError, ValueError) as exc:
                say(f"the warm model at {warm.socket} stopped answering ({exc}; log: {warm.log}); answering here")
                return None
        if reply.get("stale"):
            continue
        pid = int(reply["pid"])
        if started is not None:  # said once it answers, so that a checkpoint it could not load is not announced
            say(started_notice(warm, pid, idle_s))
        if "error" in reply:
            raise WarmError(str(reply["error"]), int(reply["exit_code"]))
        return Reply(str(reply["answer"]), pid, started=started is not None)
    say(f"no warm model came up for {warm.checkpoint} (log: {warm.log}); answering here")
    return None


def _raise_load_error(warm: Warm) -> None:
    """Raise the error the last server met loading this checkpoint, when that is why it is not there."""
    info = read_info(warm.info)
    if info is not None and info.get("key") == warm.key and "error" in info and not alive(int(info.get("pid", 0))):
        raise WarmError(str(info["error"]), int(info["exit_code"]))


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running warm server (any process when /proc cannot tell)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # the pid just ended, or there is no /proc to ask
    except OSError:
        return True
    # A zombie's cmdline is empty: it has ended, its parent has not collected it yet.
    return SERVER_MODULE.encode() in cmdline


def stop_all(cache: str | os.PathLike[str], *, timeout_s: float = QUICK_TIMEOUT_S) -> list[dict[str, Any]]:
    """Stop every warm server under ``cache`` (running or still loading); what each said about itself."""
    folder = Path(cache).expanduser().resolve() / "warm"
    stopped = []
    for info_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        info = read_info(info_path)
        if info is None:
            continue
        pid = int(info.get("pid", 0))
        if alive(pid):
            try:
                with connect(folder / f"{info_path.stem}.sock", QUICK_TIMEOUT_S) as sock:
                    exchange(sock, {"op": "stop"}, lambda _text: None)
            except (OSError, ValueError):  # still loading, or busy: the signal ends it as well
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                continue
            stopped.append(info)
        with contextlib.suppress(FileNotFoundError):
            info_path.unlink()  # a dead server's record
    return stopped


def remove_if_same(path: Path, inode: int) -> None:
    """Remove ``path`` only while it is still the file ``inode``: a newer server may have bound its own."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def write_info(warm: Warm, **fields: Any) -> None:
    write_json_atomic(warm.info, {"pid": os.getpid(), "key": warm.key, "checkpoint": str(warm.checkpoint),
                                  "device": warm.device, "socket": str(warm.socket), **fields})
