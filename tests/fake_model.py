"""A small OpenAI-compatible model server: the one stand-in the Letta upstream tests allow.

The real Letta server (tests/letta_upstream.py) reads `GET /v1/models` at start and offers each known
name as `openai-proxy/<name>`; a turn is `POST /v1/chat/completions`, plain JSON for `/messages` and
Server-Sent Events (`stream: true`) for `stream_tokens`. The reply is deterministic, `Tether heard: <the
last user message>`, and never a tool call: Letta's default agent (`letta_v1_agent`) ends its turn on
plain assistant text, also after a tool result. Streamed, the reply comes a word per chunk, so a client
sees several deltas. Every request is recorded for the tests to look at.

The reply logic is pure (`reply_for`, `completion`, `stream_chunks`); `FakeModel` serves it from a
thread of the test process with the standard library's HTTP server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
MODELS = ("gpt-4o-mini",)
REPLY_PREFIX = "Tether heard: "
# Requests kept for assertions (oldest dropped), and the largest request body read (larger: 413).
RECORD_LIMIT = 1000
BODY_LIMIT = 16 * 1024 * 1024
_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
CREATED = 1_700_000_000  # a fixed timestamp keeps the answers byte-for-byte deterministic


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the JSON body, None when there was none


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message, unwrapped from the JSON envelope older Letta agents put it in,
    without the `<system-reminder>` blocks Letta Code puts before what the user typed."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        text = _REMINDER.sub("", _text(message.get("content"))).strip()
        try:
            packed = json.loads(text)
        except ValueError:
            return text
        if isinstance(packed, dict) and isinstance(packed.get("message"), str):
            return str(packed["message"])
        return text
    return ""


def reply_for(body: dict[str, Any]) -> str:
    return f"{REPLY_PREFIX}{last_user_text(body.get('messages') or [])}"


def _usage(body: dict[str, Any], reply: str) -> dict[str, int]:
    # Words stand in for tokens: deterministic, and nonzero whenever there is text.
    prompt = sum(len(_text(m.get("content")).split()) for m in body.get("messages") or [])
    completion = len(reply.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(body: dict[str, Any], call: int) -> dict[str, Any]:
    """The non-streaming answer to the `call`-th chat completion request."""
    reply = reply_for(body)
    return {
        "id": f"chatcmpl-fake-{call}",
        "object": "chat.completion",
        "created": CREATED,
        "model": body.get("model", MODELS[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(body, reply),
        "system_fingerprint": "fp_tether_fake",
    }


def stream_chunks(body: dict[str, Any], call: int) -> list[dict[str, Any]]:
    """The `chat.completion.chunk`s of a streamed answer, a word per chunk, usage last when asked for."""
    reply = reply_for(body)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base: dict[str, Any] = {
        "id": f"chatcmpl-fake-{call}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": body.get("model", MODELS[0]),
        "system_fingerprint": "fp_tether_fake",
    }
    if include_usage:
        base["usage"] = None  # as OpenAI sends it on every chunk but the last

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in re.findall(r"\S+\s*", reply)]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": _usage(body, reply)})
    return chunks


def _piece(chunk: dict[str, Any]) -> str:
    """The content a streamed chunk carries ('' for role, finish and usage chunks)."""
    choices = chunk.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


class FakeModel:
    """The model server, on a free port of 127.0.0.1; `base_url` is what OPENAI_BASE_URL takes."""

    def __init__(self, models: tuple[str, ...] = MODELS) -> None:
        self.models = models
        self._records: deque[RecordedRequest] = deque(maxlen=RECORD_LIMIT)
        self._lock = threading.Lock()
        self._calls = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # A slow provider: seconds before any answer, and between streamed chunks.
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        # (content piece, time.monotonic() when written) of streamed chunks, for latency figures.
        self.emitted: deque[tuple[str, float]] = deque(maxlen=RECORD_LIMIT * 10)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the fake model is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def chat_requests(self) -> list[dict[str, Any]]:
        """The bodies of the chat completion requests, oldest first."""
        return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def _record(self, request: RecordedRequest) -> int:
        with self._lock:
            self._records.append(request)
            self._calls += 1
            return self._calls

    def start(self) -> FakeModel:
        if self._httpd is not None:
            return self
        self._httpd = ThreadingHTTPServer((HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> FakeModel:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _handler(model: FakeModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the recorded requests say what came in

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send_json(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def _route(self) -> str:
            return self.path.split("?", 1)[0].rstrip("/").removeprefix("/v1")

        def do_GET(self) -> None:
            model._record(RecordedRequest("GET", self.path, dict(self.headers.items()), None))
            if self._route() != "/models":
                self._error(404, f"no route GET {self.path}")
                return
            rows = [
                {"id": name, "object": "model", "created": CREATED, "owned_by": "tether"}
                for name in model.models
            ]
            self._send_json(200, {"object": "list", "data": rows})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > BODY_LIMIT:
                self.close_connection = True
                self._error(413, f"request body over {BODY_LIMIT} bytes")
                return
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            call = model._record(RecordedRequest("POST", self.path, dict(self.headers.items()), body))
            if self._route() != "/chat/completions":
                self._error(404, f"no route POST {self.path}")
                return
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._error(400, "the body must be a JSON object with a `messages` list")
                return
            if body.get("model") not in model.models:
                self._error(404, f"the model `{body.get('model')}` does not exist")
                return
            if model.delay_s:
                time.sleep(model.delay_s)
            if not body.get("stream"):
                self._send_json(200, completion(body, call))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunks = stream_chunks(body, call)
            events = [(f"data: {json.dumps(c)}\n\n", _piece(c)) for c in chunks] + [("data: [DONE]\n\n", "")]
            for event, piece in events:
                if piece and model.chunk_delay_s:
                    time.sleep(model.chunk_delay_s)
                data = event.encode()
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if piece:
                    model.emitted.append((piece, time.monotonic()))
            self.wfile.write(b"0\r\n\r\n")

    return Handler
