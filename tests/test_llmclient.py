"""LLMClient against a local fake chat-completions server: retries, cache, concurrency, errors."""

from __future__ import annotations

import json
import socket
import time

import pytest

from slidevl.llmclient import API_KEY_ENV, LLMClient, LLMError, LLMUnreachableError, request_key
from test_llmclient_server import FakeChatServer, echo_last_user


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def make_client(server: FakeChatServer, **kwargs) -> LLMClient:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout", 5)
    return LLMClient(server.base_url, "fake-model", **kwargs)


def test_chat_sends_model_messages_and_temperature_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with FakeChatServer(echo_last_user) as server, make_client(server) as client:
        assert client.chat(user("hello"), max_tokens=32) == "echo: hello"
    (body,) = server.requests
    assert body == {"model": "fake-model", "messages": user("hello"), "temperature": 0.0, "max_tokens": 32}
    assert "authorization" not in {k.lower() for k in server.headers[0]}


def test_api_key_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    with FakeChatServer(echo_last_user) as server, make_client(server) as client:
        client.chat(user("x"))
    assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_retries_transient_status_then_succeeds(status: int) -> None:
    with FakeChatServer(echo_last_user, fail_with=[status]) as server, make_client(server) as client:
        assert client.chat(user("again")) == "echo: again"
    assert len(server.requests) == 2
    assert client.stats["retries"] == 1


def test_gives_up_after_max_retries() -> None:
    with FakeChatServer(echo_last_user, fail_with=[500] * 5) as server, make_client(server, max_retries=2) as client:
        with pytest.raises(LLMError, match=r"HTTP 500.*gave up after 3 attempts"):
            client.chat(user("x"))
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("status", "hint"),
    [(400, "HTTP 400"), (401, API_KEY_ENV), (404, "--llm-url")],
)
def test_client_errors_are_not_retried(status: int, hint: str) -> None:
    with FakeChatServer(echo_last_user, fail_with=[status]) as server, make_client(server) as client:
        with pytest.raises(LLMError, match=hint) as info:
            client.chat(user("x"))
    assert len(server.requests) == 1
    assert server.base_url in str(info.value)


def test_unreachable_endpoint_names_url_and_flag() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LLMClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01, timeout=2)
    with pytest.raises(LLMUnreachableError) as info:
        client.chat(user("x"))
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message
    assert "--llm-url" in message and "gave up after 2 attempts" in message


def test_timeout_is_retried_then_reported() -> None:
    def slow(body: dict) -> str:
        time.sleep(0.6)
        return "late"

    with FakeChatServer(slow) as server, make_client(server, timeout=0.2, max_retries=1) as client:
        with pytest.raises(LLMError, match=r"timed out after 0\.2 s"):
            client.chat(user("x"))
    assert len(server.requests) == 2


def test_malformed_completion_is_a_clear_error() -> None:
    with FakeChatServer(echo_last_user) as server:
        server.reply = lambda body: None  # type: ignore[assignment,return-value]
        with make_client(server) as client, pytest.raises(LLMError, match="no text content"):
            client.chat(user("x"))


def test_chat_many_preserves_order_bounds_concurrency_and_dedups() -> None:
    prompts = [f"question {i}" for i in range(12)] + ["question 3", "question 5"]
    with FakeChatServer(echo_last_user) as server, make_client(server, max_concurrency=3) as client:
        replies = client.chat_many([user(p) for p in prompts])
    assert replies == [f"echo: {p}" for p in prompts]
    assert len(server.requests) == 12  # the two repeated prompts were sent once
    assert 1 < server.max_in_flight <= 3


def test_cache_makes_reruns_free_and_identical(tmp_path) -> None:
    cache = tmp_path / "llm-cache"
    prompts = [user(f"p{i}") for i in range(5)]
    with FakeChatServer(echo_last_user) as server:
        with make_client(server, cache_dir=cache) as client:
            first = client.chat_many(prompts)
        assert len(server.requests) == 5
        with make_client(server, cache_dir=cache) as client:
            second = client.chat_many(prompts)
            assert client.stats == {"requests": 0, "cache_hits": 5, "retries": 0}
        assert second == first and len(server.requests) == 5
        # Another temperature is another request.
        with make_client(server, cache_dir=cache) as client:
            client.chat(prompts[0], temperature=0.7)
        assert len(server.requests) == 6
    files = sorted(cache.rglob("*.json"))
    assert len(files) == 6
    entry = json.loads(files[0].read_text())
    assert set(entry) == {"version", "request", "reply", "created"}
    assert files[0].stem == request_key(entry["request"])
    assert not list(cache.rglob("*.partial"))


def test_corrupt_cache_entry_is_refetched(tmp_path) -> None:
    with FakeChatServer(echo_last_user) as server:
        with make_client(server, cache_dir=tmp_path) as client:
            client.chat(user("q"))
        (path,) = tmp_path.rglob("*.json")
        path.write_text("{not json")
        with make_client(server, cache_dir=tmp_path) as client:
            assert client.chat(user("q")) == "echo: q"
        assert len(server.requests) == 2
        assert json.loads(path.read_text())["reply"] == "echo: q"


def test_cache_key_depends_on_model_messages_and_params() -> None:
    base = {"model": "m", "messages": user("a"), "temperature": 0.0}
    assert request_key(base) == request_key(dict(reversed(list(base.items()))))
    assert request_key(base) != request_key({**base, "model": "n"})
    assert request_key(base) != request_key({**base, "messages": user("b")})
    assert request_key(base) != request_key({**base, "max_tokens": 5})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "127.0.0.1:8001/v1"}, "http://"),
        ({"model": ""}, "model name"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict, match: str) -> None:
    args = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        LLMClient(**args)


def test_invalid_messages_are_rejected() -> None:
    client = LLMClient("http://127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="non-empty list"):
        client.chat("hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        client.chat([{"content": "no role"}])
