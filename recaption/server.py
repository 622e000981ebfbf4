"""A small OpenAI-compatible chat-completions server around any TextBackend (standard library only).

Serves `POST /v1/chat/completions` (system/user messages, text and base64 `image_url` parts) and `GET /v1/models`
on a local address, one generation at a time. It exists so that the HTTP backend can be exercised end to end
against a real model without the network (the tests serve tiny transformers models with it), and so that a
model loaded once can serve several local processes. It is not a production server: no streaming, no batching
across requests, no TLS. With `api_key` set, requests must carry `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clipmill.recaption.textgen import GenRequest, TextBackend, decode_data_url

log = logging.getLogger(__name__)


def request_from_messages(messages: list[dict[str, Any]]) -> GenRequest:
    """The GenRequest of OpenAI-style chat messages (system text; user text and images). ValueError if malformed."""
    system, texts, images = [], [], []
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        role, content = m.get("role"), m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError("message content must be a string or a list of parts")
        for p in parts:
            if p.get("type") == "text":
                (system if role == "system" else texts).append(str(p.get("text", "")))
            elif p.get("type") == "image_url":
                images.append(decode_data_url(p["image_url"]["url"]))
            else:
                raise ValueError(f"unsupported content part type {p.get('type')!r}")
    return GenRequest(prompt="\n".join(texts), system="\n".join(system) or None, images=images)


class ChatHandler(BaseHTTPRequestHandler):
    """Request handler; `self.server.app` is the ChatServer. Subclass to change behaviour (tests do)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def send_json(self, code: int, data: Any) -> None:
        body = json.dumps(data).encode("utf-8")
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError as exc:  # the client gave up (its timeout) or went away
            log.debug("client %s left before the reply: %s", self.address_string(), exc)

    def _authorised(self) -> bool:
        key = self.server.app.api_key  # type: ignore[attr-defined]
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_json(401, {"error": {"message": "missing or wrong API key", "type": "auth"}})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            app = self.server.app  # type: ignore[attr-defined]
            self.send_json(200, {"object": "list", "data": [{"id": app.model, "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
            req = request_from_messages(body.get("messages"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.send_json(400, {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}})
            return
        self.send_json(*self.server.app.complete(req, body))  # type: ignore[attr-defined]


class ChatServer:
    """Serve `backend` at http://host:port/v1 (port 0 = a free one) from a background thread.

    Use as a context manager, or `start()` / `stop()`. `url` is the base_url a client needs.
    """

    def __init__(self, backend: TextBackend, *, host: str = "127.0.0.1", port: int = 0, model: str | None = None,
                 api_key: str | None = None, handler: type[ChatHandler] = ChatHandler) -> None:
        self.backend = backend
        self.model = model or backend.model_name
        self.api_key = api_key
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.requests = 0

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def complete(self, req: GenRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, JSON reply) for one chat request."""
        with self._lock:
            self.requests += 1
            res = self.backend.generate([req])[0]
        if res.error:
            code = 400 if res.error.startswith("context overflow") else 500
            return code, {"error": {"message": res.error, "type": "server_error" if code == 500 else "invalid_request"}}
        return 200, {
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": res.tokens, "total_tokens": res.tokens},
        }

    def start(self) -> ChatServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="clipmill-chat-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
