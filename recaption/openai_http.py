"""Backend for any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp server, Ollama, hosted APIs).

Each request is one POST to `{base_url}/chat/completions` with the frames as base64 JPEG `image_url` parts.
Requests run in a bounded thread pool (`concurrency`), each with a socket timeout (`timeout_s`), and are
retried with exponential backoff (`backoff_s * 2**attempt`, plus up to 25% jitter) on timeouts, refused
connections, HTTP 429 and 5xx, and malformed replies. A 4xx other than 429 (bad request, context overflow,
unknown model, bad key) is not retried. After the last attempt the request's error is returned as data.

The API key is read from the environment variable NAMED by `api_key_env` when the backend is built; it is
sent only in the Authorization header and never logged, returned in an error or written anywhere.
Standard library only (urllib + concurrent.futures).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipmill.recaption.textgen import (
    GenRequest,
    GenResult,
    TextBackend,
    clean_reply,
    one_line,
    openai_messages,
)

log = logging.getLogger(__name__)


class RetryableError(RuntimeError):
    """A failure worth another attempt (timeout, 5xx, 429, malformed reply, connection refused)."""


class FinalError(RuntimeError):
    """A failure another attempt will not fix (4xx other than 429, context overflow)."""


class OpenAIBackend(TextBackend):
    """Chat completions over HTTP (see the module docstring).

    Args:
        base_url: the API root, e.g. http://127.0.0.1:8000/v1 (the path /chat/completions is appended).
        model: the model name the server knows.
        api_key_env: name of the environment variable holding the API key (None = no key sent).
        timeout_s, retries, backoff_s, concurrency: see the module docstring.
        max_new_tokens, temperature: sent as max_tokens and temperature.
        image_quality: JPEG quality of the frames sent.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, concurrency: int = 8, max_new_tokens: int = 256,
                 temperature: float = 0.0, image_quality: int = 90, extra_body: dict[str, Any] | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set or empty; export the "
                                 f"API key in it, or drop api_key_env for a server without keys")
            self._key = key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency = max(1, concurrency)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.image_quality = image_quality
        self.extra_body = dict(extra_body or {})
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="clipmill-http")

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model_name!r})"

    # ------------------------------------------------------------------------------------------ one call

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - http(s) only, checked
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = self._scrub(exc.read()[:400].decode("utf-8", "replace"))
            if exc.code == 429 or exc.code >= 500:
                raise RetryableError(f"http {exc.code}: {one_line(detail, 200)}") from None
            low = detail.lower()
            if exc.code in (400, 413) and ("context" in low or "too long" in low or "maximum" in low):
                raise FinalError(f"context overflow: http {exc.code}: {one_line(detail, 200)}") from None
            raise FinalError(f"http {exc.code}: {one_line(detail, 200)}") from None
        except TimeoutError:
            raise RetryableError(f"timeout after {self.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise RetryableError(f"timeout after {self.timeout_s:g} s") from None
            raise RetryableError(f"connection failed: {one_line(self._scrub(str(exc.reason)), 200)}") from None
        except (ConnectionError, OSError) as exc:
            raise RetryableError(f"connection failed: {one_line(self._scrub(str(exc)), 200)}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise RetryableError(f"malformed reply: not JSON: {one_line(self._scrub(raw[:120].decode('utf-8', 'replace')), 160)}") from None
        return data

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    @staticmethod
    def _text_of(data: Any) -> tuple[str, int]:
        try:
            msg = data["choices"][0]["message"]
            content = msg.get("content")
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise TypeError("content is not text")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RetryableError(f"malformed reply: no choices[0].message.content ({exc})") from None
        text = clean_reply(content)
        if not text:
            raise RetryableError("malformed reply: empty content")
        usage = data.get("usage") if isinstance(data, dict) else None
        tokens = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
        return text, int(tokens or 0)

    def _one(self, req: GenRequest) -> GenResult:
        body = {"model": self.model_name, "messages": openai_messages(req, image_quality=self.image_quality),
                "max_tokens": self.max_new_tokens, "temperature": self.temperature, **self.extra_body}
        payload = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            try:
                text, tokens = self._text_of(self._post(payload))
                return GenResult(text=text, tokens=tokens)
            except FinalError as exc:
                return GenResult(error=str(exc))
            except RetryableError as exc:
                last = str(exc)
                if attempt < self.retries:
                    delay = self.backoff_s * (2 ** attempt) * (1.0 + 0.25 * random.random())
                    log.info("openai backend: %s; retry %d/%d in %.1f s", last, attempt + 1, self.retries, delay)
                    time.sleep(delay)
        return GenResult(error=f"{last} (after {self.retries + 1} attempts)")

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
