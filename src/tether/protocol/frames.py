"""Frame shapes and the few byte-level operations the relay does on frames.

Frames are relayed as the device sent them; the router parses each one once to route it and,
for relay sockets, splices a per-socket `seq` in front instead of re-encoding the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

PONG = '{"type":"pong"}'

# Device permission modes onto the REST `currentMode` enum. `strict` has no REST value: the row
# shows currentMode null and keeps the exact mode in metadata.permissionMode.
_REST_MODES = {
    "standard": "standard",
    "default": "standard",
    "acceptEdits": "acceptEdits",
    "unrestricted": "unrestricted",
    "bypassPermissions": "unrestricted",
    "fullAccess": "unrestricted",
}


class FrameError(ValueError):
    """A frame that is not a JSON object with a string `type`."""


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which tripled the cost
# of building one (one per relayed frame). Nothing writes to a Frame after `decode`.
@dataclass(slots=True)
class Frame:
    """One parsed frame plus the routing facts the relay needs, read once."""

    text: str
    body: dict[str, Any]
    type: str
    request_id: str | None
    agent_id: str | None
    conversation_id: str | None
    event_seq: int | None

    @property
    def scoped(self) -> bool:
        return self.agent_id is not None or self.conversation_id is not None


def decode(data: str | bytes) -> Frame:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FrameError("not a JSON object")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise FrameError("no string `type`")
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    request_id = body.get("request_id")
    runtime = body.get("runtime")
    agent_id = conversation_id = None
    if isinstance(runtime, dict):
        agent = runtime.get("agent_id")
        conv = runtime.get("conversation_id")
        agent_id = agent if isinstance(agent, str) else None
        conversation_id = conv if isinstance(conv, str) else None
    event_seq = body.get("event_seq")
    return Frame(
        text=text,
        body=body,
        type=kind,
        request_id=request_id if isinstance(request_id, str) and request_id else None,
        agent_id=agent_id,
        conversation_id=conversation_id,
        event_seq=event_seq if isinstance(event_seq, int) and not isinstance(event_seq, bool) else None,
    )


def encode(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def with_seq(text: str, seq: int) -> str:
    """Prefix `"seq":N` to a JSON object's text without re-encoding the rest.

    `seq` is the router's (per relay socket). A device frame carrying its own top-level `seq` would
    otherwise reach the client with two, and JSON parsers keep the last: the device's number would
    replace ours (found by fuzzing). Such a frame is re-encoded without it; the substring test keeps
    every other frame on the splice.
    """
    if '"seq"' in text:
        body = orjson.loads(text)
        if isinstance(body, dict) and "seq" in body:
            del body["seq"]
            return encode({"seq": seq, **body})
    start = text.index("{")
    rest = text[start + 1 :].lstrip()
    if rest.startswith("}"):
        return f'{{"seq":{seq}}}'
    return f'{{"seq":{seq},{rest}'


def listener_ready(generation: str, attempt: int) -> str:
    return encode(
        {"type": "listener_ready", "connection_generation": generation, "connection_attempt": attempt}
    )


def error_frame(request_id: str | None, message: str, code: str = "environment_offline") -> str:
    frame: dict[str, Any] = {
        "type": "error",
        "success": False,
        "error": message,
        "message": message,
        "code": code,
    }
    if request_id is not None:
        frame["request_id"] = request_id
    return encode(frame)


def rest_mode(device_mode: object) -> str | None:
    return _REST_MODES.get(device_mode) if isinstance(device_mode, str) else None


def status_fields(body: dict[str, Any]) -> tuple[str | None, dict[str, Any]] | None:
    """What an `update_device_status` frame changes on the row: (currentMode, metadata patch)."""
    status = body.get("device_status")
    if not isinstance(status, dict):
        return None
    patch: dict[str, Any] = {}
    mode = status.get("current_permission_mode")
    if isinstance(mode, str):
        patch["permissionMode"] = mode
    cwd = status.get("current_working_directory")
    if isinstance(cwd, str):
        patch["workingDirectory"] = cwd
    git = status.get("git_context")
    if isinstance(git, dict):
        branch = git.get("branch")
        patch["gitBranch"] = branch if isinstance(branch, str) else None
    elif "git_context" in status and git is None:
        patch["gitBranch"] = None
    return rest_mode(mode), patch


def scoped_sync(agent_id: str, conversation_id: str, request_id: str) -> str:
    """The command that subscribes a device connection to a runtime scope (device-protocol §3.7)."""
    return encode(
        {
            "type": "sync",
            "request_id": request_id,
            "runtime": {"agent_id": agent_id, "conversation_id": conversation_id},
            "recover_approvals": False,
            "force_device_status": False,
        }
    )
