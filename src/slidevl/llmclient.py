"""A small client for any OpenAI-compatible chat-completions endpoint.

Used wherever slidevl asks a language model for text: the VQA judge, and caption
and question generation during data construction. Works with vLLM, SGLang,
llama.cpp's server, Ollama, or a hosted API::

    client = LLMClient("http://127.0.0.1:8001/v1", "Qwen2.5-7B-Instruct", cache_dir="cache/llm")
    text = client.chat([{"role": "user", "content": "Hello"}])
    texts = client.chat_many([messages_1, messages_2])   # same order as the input

- Temperature is 0 unless a call says otherwise.
- Requests run at most ``max_concurrency`` at a time (a thread pool).
- 408/409/425/429 and 5xx answers, timeouts and dropped connections are retried
  ``max_retries`` times with exponential backoff (``Retry-After`` is honoured).
- With ``cache_dir`` every answer is stored as one JSON file named by a SHA-256 of
  the request (model, messages, temperature and every other parameter; not the
  URL, so a server moved to another port keeps its cache). A rerun with the same
  requests sends nothing and returns the same text.
- The API key comes from ``api_key`` or the environment variable
  ``SLIDEVL_LLM_API_KEY``; local servers usually need none.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_EXCEPTION
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import httpx

from slidevl.atomic import write_json_atomic
from slidevl.errors import InputError, ServiceError

API_KEY_ENV = "SLIDEVL_LLM_API_KEY"
URL_FLAG = "--llm-url"
CACHE_VERSION = 1
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 60.0

Message = Mapping[str, Any]


class LLMError(ServiceError):
    """The endpoint answered with an error, or with something that is not a chat completion."""


class LLMUnreachableError(LLMError):
    """No connection to the endpoint could be made."""


class LLMClient:
    """Chat completions against ``base_url`` (the part before ``/chat/completions``)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        max_concurrency: int = 4,
        max_retries: int = 3,
        timeout: float = 60,
        *,
        temperature: float = 0.0,
        backoff_s: float = 1.0,
    ) -> None:
        if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https"):
            raise InputError(
                f"LLM base URL {base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8001/v1; "
                f"set it with {URL_FLAG})"
            )
        if not model:
            raise InputError("an LLM model name is required (the name the server lists under /v1/models)")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise InputError("max_concurrency >= 1, max_retries >= 0 and timeout > 0 are required")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_s = backoff_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            # A proxy from the environment never makes sense for a server on this machine.
            trust_env=not _is_loopback(self.base_url),
        )
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def describe(self) -> dict[str, Any]:
        """Settings worth recording next to results (no API key)."""
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature}

    def chat(self, messages: Sequence[Message], **params: Any) -> str:
        """The assistant's reply to ``messages``; ``params`` go into the request body."""
        return self.chat_many([messages], **params)[0]

    def chat_many(self, conversations: Sequence[Sequence[Message]], **params: Any) -> list[str]:
        """Replies to many conversations, in input order, at most ``max_concurrency`` in flight.

        Identical requests are sent once. The first failure stops what has not
        started yet and is raised; answers already received stay in the cache.
        """
        bodies = [self._body(messages, params) for messages in conversations]
        keys = [request_key(body) for body in bodies]
        replies: dict[str, str] = {}
        todo: dict[str, dict[str, Any]] = {}
        for key, body in zip(keys, bodies):
            if key in replies or key in todo:
                continue
            cached = self._cache_get(key, body)
            if cached is not None:
                replies[key] = cached
            else:
                todo[key] = body
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo))) as pool:
                futures = {pool.submit(self._fetch, key, body): key for key, body in todo.items()}
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in futures:
                        f.cancel()
                    raise failed[0].exception()  # type: ignore[misc]
                for future, key in futures.items():
                    replies[key] = future.result()
        return [replies[key] for key in keys]

    def _body(self, messages: Sequence[Message], params: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        body["temperature"] = params.get("temperature", self.temperature)
        body.update({k: v for k, v in params.items() if k != "temperature"})
        return body

    def _fetch(self, key: str, body: dict[str, Any]) -> str:
        reply = self._post(body)
        self._cache_put(key, body, reply)
        return reply

    def _post(self, body: dict[str, Any]) -> str:
        attempt = 0
        while True:
            with self._lock:
                self.stats["requests"] += 1
            delay: float | None = None
            try:
                response = self._http.post(self.url, json=body)
            except httpx.ConnectError as exc:
                error: LLMError = LLMUnreachableError(
                    f"cannot reach the LLM endpoint {self.url} ({exc}); start the server or point {URL_FLAG} "
                    "at its OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1"
                )
            except httpx.TimeoutException as exc:
                error = LLMError(f"LLM endpoint {self.url} timed out after {self.timeout:g} s ({type(exc).__name__})")
            except httpx.TransportError as exc:
                error = LLMError(f"LLM endpoint {self.url} dropped the connection ({exc!r})")
            else:
                if response.status_code == 200:
                    return self._content(response)
                error = self._status_error(response)
                if response.status_code not in _RETRY_STATUS:
                    raise error
                delay = _retry_after(response)
            if attempt >= self.max_retries:
                if self.max_retries:
                    raise type(error)(f"{error} (gave up after {attempt + 1} attempts)")
                raise error
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(delay if delay is not None else self.backoff_s * 2**attempt)
            attempt += 1

    def _status_error(self, response: httpx.Response) -> LLMError:
        status = response.status_code
        detail = response.text[:300].strip()
        hint = ""
        if status in (401, 403):
            hint = f"; set the API key in the environment variable {API_KEY_ENV}"
        elif status == 404:
            hint = (
                f"; check that {URL_FLAG} ends at the API root (usually '/v1') and that the server "
                f"serves the model {self.model!r}"
            )
        return LLMError(f"LLM endpoint {self.url} answered HTTP {status}{hint}: {detail}")

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(
                f"LLM endpoint {self.url} did not return a chat completion ({exc!r}): {response.text[:300]}"
            ) from exc
        if not isinstance(content, str):
            raise LLMError(f"LLM endpoint {self.url} returned no text content: {response.text[:300]}")
        return content

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        # Two-character shards keep directories small for large generation runs.
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str, body: dict[str, Any]) -> str | None:
        if self.cache_dir is None:
            return None
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable entry: fetch again and overwrite it
        # The stored request must match: guards against edited files and format changes.
        if entry.get("version") != CACHE_VERSION or entry.get("request") != _jsonable(body):
            return None
        reply = entry.get("reply")
        if not isinstance(reply, str):
            return None
        with self._lock:
            self.stats["cache_hits"] += 1
        return reply

    def _cache_put(self, key: str, body: dict[str, Any], reply: str) -> None:
        if self.cache_dir is None:
            return
        entry = {"version": CACHE_VERSION, "request": _jsonable(body), "reply": reply, "created": time.time()}
        write_json_atomic(self._cache_path(key), entry)


def request_key(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body: the cache key."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((f"v{CACHE_VERSION}\n" + canonical).encode("utf-8")).hexdigest()


def _jsonable(body: Mapping[str, Any]) -> Any:
    # What the body looks like after a JSON round trip (tuples become lists).
    return json.loads(json.dumps(body, ensure_ascii=False))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP date; plain backoff is good enough


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
