"""A local, deterministic OpenAI-compatible chat-completions server for the client and judge tests.

It listens on 127.0.0.1 on a free port, in a daemon thread, and answers
``POST <base>/chat/completions`` with whatever its ``reply`` function returns for
the request body. ``fail_with`` queues HTTP statuses to answer first (to test
retries); every request body is recorded in ``requests``. ``fake_judge`` is a
reply function that plays the VQA judge deterministically.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx


class FakeChatServer:
    """Context manager running a fake chat-completions endpoint; ``base_url`` ends in ``/v1``."""

    def __init__(self, reply: Callable[[dict[str, Any]], str], fail_with: list[int] | None = None) -> None:
        self.reply = reply
        self.fail_with = list(fail_with or [])
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # http.server names handlers do_<METHOD>
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    status = server.fail_with.pop(0) if server.fail_with else 200
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                headers: dict[str, str] | None = None
                try:
                    if status != 200:
                        payload = {"error": {"message": f"injected failure {status}"}}
                        headers = {"Retry-After": "0"}
                    else:
                        payload = {
                            "id": "chatcmpl-fake",
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": server.reply(body)},
                                         "finish_reason": "stop"}],
                        }
                finally:
                    # Leave the count before the reply goes out: once the client has read it, it may
                    # send its next request before this thread would get past a write.
                    with server._lock:
                        server.in_flight -= 1
                self._send(status, payload, headers)

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def echo_last_user(body: dict[str, Any]) -> str:
    """Reply with the last message's content, after a short delay that depends on it.

    The delay scrambles completion order, so order preservation is really tested.
    """
    content = body["messages"][-1]["content"]
    time.sleep(0.002 * (sum(map(ord, content)) % 7))
    return f"echo: {content}"


_WORD = re.compile(r"[a-z0-9]+")


def fake_judge(body: dict) -> str:
    """Claims = the reference's sentences; claim score = share of its words in the prediction.

    Replies are wrapped the way real models wrap JSON (fences, chatter) so the
    judge's lenient parsing is exercised; a reference containing UNPARSEABLE gets
    a reply with no JSON at all.
    """
    payload = json.loads(body["messages"][-1]["content"].split("Input:\n", 1)[1])
    if "claims" not in payload:
        reference = payload["reference_answer"]
        if "UNPARSEABLE" in reference:
            return "I am unable to split this answer."
        claims = [s.strip() for s in re.split(r"(?<=[.!?])\s+", reference) if s.strip()]
        return "Here are the claims:\n" + json.dumps(claims) + "\nLet me know if you need more."
    prediction = set(_WORD.findall(payload["candidate_answer"].lower()))
    scores = []
    for claim in payload["claims"]:
        words = set(_WORD.findall(claim.lower()))
        share = len(words & prediction) / len(words)
        scores.append(1 if share == 1 else 0.7 if share >= 0.6 else 0.3 if share >= 0.3 else 0)
    return "```json\n" + json.dumps(scores) + "\n```"


def test_fake_server_speaks_chat_completions() -> None:
    with FakeChatServer(echo_last_user, fail_with=[503]) as server:
        url = server.base_url + "/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(trust_env=False, timeout=5) as http:
            first = http.post(url, json=body)
            second = http.post(url, json=body)
            missing = http.post(server.base_url + "/nowhere", json=body)
    assert first.status_code == 503 and first.headers["retry-after"] == "0"
    assert second.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert missing.status_code == 404
    assert len(server.requests) == 2
