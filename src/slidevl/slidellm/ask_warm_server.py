"""The background process that keeps a checkpoint loaded for ``slidevl ask``.

Started by :func:`slidevl.slidellm.ask_warm.start` (``python -m slidevl.slidellm.ask_warm_server``),
holding the start lock it was handed until its socket is bound. It answers one request
at a time, each exactly as ``slidevl ask`` in a new process would: in the asking
command's working folder, with the same :class:`~slidevl.slidellm.ask.SlideAssistant`
calls, greedy decoding and errors. It exits after ``--idle`` seconds without a request,
on ``slidevl ask --stop-warm``, on SIGTERM, or when a request carries a newer key (the
checkpoint changed on disk), removing its socket and record.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console

from slidevl.errors import EXIT_FAILED, EXIT_SIGTERM, SlideVLError
from slidevl.slidellm.ask_warm import (
    QUICK_TIMEOUT_S, Warm, connect, exchange, ping, read_info, remove_if_same, send, target, unix_address, write_info,
)


class _Frames:
    """A text stream that sends what is written to it to the asking command's stderr."""

    def __init__(self, conn: socket.socket, tty: bool) -> None:
        self.conn = conn
        self.tty = tty
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        if text:
            send(self.conn, {"stderr": text})
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def _make_way(warm: Warm) -> bool:
    """Free the socket path for this server; False when a server with the same key already answers there."""
    running = ping(warm.socket)
    if running is not None:
        if running.get("key") == warm.key:
            return False
        # The server of an older state of the checkpoint (or an older slidevl): it goes.
        with contextlib.suppress(OSError, ValueError), connect(warm.socket, QUICK_TIMEOUT_S) as sock:
            exchange(sock, {"op": "stop"}, lambda _text: None)
    # What is left is the socket of a dead server, or of one too busy to answer a ping (it
    # finishes its answer and idles out): either way the path is this server's now.
    with contextlib.suppress(FileNotFoundError):
        warm.socket.unlink()
    return True


def _bind(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # born 0600: no moment where another user could connect
    try:
        with unix_address(path) as address:
            listener.bind(address)
    finally:
        os.umask(umask)
    listener.listen(16)
    return listener


class WarmServer:
    """A loaded :class:`SlideAssistant` answering ``slidevl ask`` requests on a Unix socket."""

    def __init__(self, warm: Warm, assistant: Any, listener: socket.socket, idle_s: float) -> None:
        self.warm = warm
        self.assistant = assistant
        self.listener = listener
        self.inode = os.stat(warm.socket).st_ino
        self.idle_s = idle_s

    def close(self) -> None:
        """Stop listening and remove the socket, unless a newer server has bound its own there."""
        self.listener.close()
        remove_if_same(self.warm.socket, self.inode)

    def serve(self) -> None:
        self.listener.settimeout(self.idle_s)
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                return
            with conn:
                try:
                    if not self.handle(conn):
                        return
                except (OSError, ValueError) as exc:  # the asking command went away, or sent no request
                    print(f"request dropped: {exc!r}", file=sys.stderr, flush=True)

    def handle(self, conn: socket.socket) -> bool:
        """Answer one request; False when this server should exit."""
        conn.settimeout(QUICK_TIMEOUT_S)  # a client that connects and says nothing does not hold the server
        with conn.makefile("r", encoding="utf-8") as lines:
            request = json.loads(lines.readline())
        conn.settimeout(None)
        op = request.get("op")
        if op == "ping":
            send(conn, {"pid": os.getpid(), "key": self.warm.key, "checkpoint": str(self.warm.checkpoint),
                        "idle_s": self.idle_s})
            return True
        if op == "stop":
            self.close()
            send(conn, {"stopped": os.getpid()})
            return False
        if op != "ask":
            send(conn, {"error": f"unknown request {op!r}", "exit_code": EXIT_FAILED, "pid": os.getpid()})
            return True
        if request.get("key") != self.warm.key:
            # The checkpoint changed on disk since it was loaded here: step down before saying so,
            # so the asking command finds the path free for a server of the new state.
            self.close()
            send(conn, {"stale": True})
            return False
        send(conn, {**self.answer(request, conn), "pid": os.getpid()})
        return True

    def answer(self, request: dict[str, Any], conn: socket.socket) -> dict[str, Any]:
        """What ``slidevl ask`` would print: the answer, or the error and its exit code."""
        from slidevl.slidellm.model import parse_bbox

        tty = bool(request.get("tty"))
        console = Console(file=_Frames(conn, tty), force_terminal=tty, width=request.get("width") or None)  # type: ignore[arg-type]
        try:
            os.chdir(request["cwd"])  # relative slide, job and --slides-root paths mean what they mean there
            # Tokens held in memory could be of features recomputed since; the disk cache is checked.
            self.assistant.forget_slides()
            region = parse_bbox(request["bbox"]) if request.get("bbox") else None
            visual = self.assistant.open_slide(request["slide"], job=request.get("job"), console=console,
                                               slides_root=request.get("slides_root"))
            answer = self.assistant.conversation(visual, bbox=region).ask(
                request["question"], max_new_tokens=int(request["max_new_tokens"]))
            return {"answer": answer}
        except SlideVLError as exc:
            return {"error": str(exc), "exit_code": exc.exit_code}
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug: kept with its traceback in the log, the command ends as a failure
            traceback.print_exc()
            return {"error": f"the warm model failed: {type(exc).__name__}: {exc} (traceback in {self.warm.log})",
                    "exit_code": EXIT_FAILED}


def _end_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_SIGTERM)  # through the finally blocks that remove the socket and record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keep a slide-LLM checkpoint loaded for `slidevl ask` (started by it).")
    parser.add_argument("--checkpoint", required=True, help="as the starting command spelled it")
    parser.add_argument("--cwd", required=True, help="the starting command's working folder")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--device")
    parser.add_argument("--idle", type=float, required=True, help="seconds without a request before exiting")
    parser.add_argument("--lock-fd", type=int, required=True, help="the start lock, held until the socket is bound")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    os.chdir(args.cwd)
    warm = target(args.checkpoint, args.device, args.cache)
    if warm is None:
        print(f"{args.checkpoint}: no checkpoint folder", file=sys.stderr)
        return EXIT_FAILED
    write_info(warm, idle_s=args.idle)
    keep_record = False
    try:
        if not _make_way(warm):
            return 0
        from slidevl.slidellm.ask import SlideAssistant

        try:
            assistant = SlideAssistant(args.checkpoint, device=args.device, cache_root=warm.cache)
        except SlideVLError as exc:
            # The asking command waits for this start and reports the error as its own.
            write_info(warm, idle_s=args.idle, error=str(exc), exit_code=exc.exit_code)
            keep_record = True
            return exc.exit_code
        server = WarmServer(warm, assistant, _bind(warm.socket), args.idle)
        fcntl.flock(args.lock_fd, fcntl.LOCK_UN)
        os.close(args.lock_fd)
        print(f"pid {os.getpid()} answering on {warm.socket}", file=sys.stderr, flush=True)
        try:
            server.serve()
        finally:
            server.close()
        return 0
    finally:
        if not keep_record:
            _remove_own_record(warm)


def _remove_own_record(warm: Warm) -> None:
    """Remove this server's record, unless a newer server has written its own since."""
    info = read_info(warm.info)
    if info is not None and info.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            warm.info.unlink()


if __name__ == "__main__":
    sys.exit(main())
