"""How the reference device answers commands: a pure state machine with no sockets and no event loop.

`Behaviour.handle` takes one decoded command and returns a `Reaction`: frames to send now, the scope the
command subscribes the connection to, and optionally a *job* -- a generator of frames and pauses that the
caller drives in the background (a turn, a queue drain, a benchmark stream). Generators keep a turn
interruptible: `abort_message` only flips a flag that the running job reads at its next step.

The shapes follow device-protocol.md §3 and the teleport steps of §6.2. Nothing here knows about
connections, envelopes, `event_seq` or subscriptions; the client adds those.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

Frame = dict[str, Any]

LETTA_CODE_VERSION = "0.32.18"

# The IDs the published CLI advertises for `execute_command` (device-protocol.md §1.1).
SUPPORTED_COMMANDS: tuple[str, ...] = (
    "clear",
    "clear-messages",
    "doctor",
    "dream",
    "reflect",
    "reflection",
    "init",
    "compact",
    "reload",
    "context-limit",
    "channels",
    "upgrade-letta-code",
    "toolset",
    "secret",
    "monitor_stop",
)

PERMISSION_MODES = frozenset({"standard", "acceptEdits", "unrestricted", "strict"})
LEGACY_MODES = {"default": "standard", "bypassPermissions": "unrestricted", "fullAccess": "unrestricted"}

# Commands of §3.5 that carry a `runtime`. The real device subscribes the connection to the runtime of any
# command it parses, even ones whose work it then declines; unknown types are dropped before that happens.
SCOPED_COMMANDS = frozenset(
    {
        "input",
        "change_device_state",
        "abort_message",
        "sync",
        "remove_queue_item",
        "resume_queue",
        "execute_command",
        "update_model",
        "update_toolset",
        "launch_subagent",
        "monitor_stop",
        "teleport_probe",
        "teleport_request",
        "teleport_failed",
        "get_reflection_settings",
        "set_reflection_settings",
        "bench_stream",
    }
)

TELEPORT_MEMORY_SECONDS = 300.0
TELEPORT_PENDING_ERROR = "Conversation already has a teleport pending"
TELEPORT_SWITCHING_ERROR = "Conversation is switching computers"
DESTINATION_BUSY_ERROR = "Destination runtime is already processing"
# Bounds the memory a long-lived device spends on input dedupe keys.
DEDUPE_KEYS_KEPT = 256


class Scope(NamedTuple):
    agent_id: str | None
    conversation_id: str

    def wire(self) -> Frame:
        return {"agent_id": self.agent_id, "conversation_id": self.conversation_id}


# The scope of the status frame the device announces on connect, before any client has named one.
DEVICE_SCOPE = Scope(None, "default")


@dataclass(frozen=True, slots=True)
class Event:
    """An enveloped, scoped device event (§3.3); delivered only to connections subscribed to `scope`."""

    frame: Frame
    scope: Scope
    # `update_device_status` is skipped when the socket already has an identical one, unless forced.
    force: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """A raw frame (§3.4), always on the control socket."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


Output = Event | Reply
Step = Output | Pause
Job = Generator[Step, None, None]


@dataclass(slots=True)
class Reaction:
    outputs: list[Output] = field(default_factory=list)
    subscribe: Scope | None = None
    job: Job | None = None


@dataclass(slots=True)
class DeviceSettings:
    """Process-wide state; unlike conversations it survives a re-registration."""

    name: str
    cwd: str
    branch: str = "main"
    mode: str = "unrestricted"
    version: str = LETTA_CODE_VERSION


@dataclass(slots=True)
class QueuedInput:
    id: str
    client_message_id: str | None
    text: str
    enqueued_at: str

    def wire(self) -> Frame:
        return {
            "id": self.id,
            "client_message_id": self.client_message_id,
            "kind": "message",
            "source": "user",
            "content": self.text,
            "enqueued_at": self.enqueued_at,
        }


@dataclass(slots=True)
class Teleport:
    """A teleport this device is the source of: waiting for a turn boundary until `ready` is set."""

    teleport_id: str
    ready: Frame | None = None  # the teleport_ready sent, kept so that a repeated request resends it
    ready_at: float | None = None
    error: str | None = None


@dataclass(slots=True)
class Conversation:
    scope: Scope
    busy: bool = False
    run_id: str | None = None
    cancel_requested: bool = False
    queue: deque[QueuedInput] = field(default_factory=deque)
    dispositions: OrderedDict[str, str] = field(default_factory=OrderedDict)
    teleports: OrderedDict[str, Teleport] = field(default_factory=OrderedDict)
    continued_teleports: OrderedDict[str, None] = field(default_factory=OrderedDict)


def iso_now(now: float) -> str:
    """`Date.prototype.toISOString()` format, which is what the real device stamps."""
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_scope(value: Any) -> Scope | None:
    if not isinstance(value, Mapping):
        return None
    agent_id = value.get("agent_id")
    conversation_id = value.get("conversation_id")
    if not (isinstance(agent_id, str) and agent_id and isinstance(conversation_id, str) and conversation_id):
        return None
    return Scope(agent_id, conversation_id)


def normalize_mode(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    mode = LEGACY_MODES.get(value, value)
    return mode if mode in PERMISSION_MODES else None


def legacy_message_to_input(frame: Mapping[str, Any]) -> Frame | None:
    """The router-forwarded environment message of §3.8, as the v2 `input` the device turns it into."""
    agent_id = frame.get("agentId")
    messages = frame.get("messages")
    if not (isinstance(agent_id, str) and agent_id and isinstance(messages, list)):
        return None
    conversation_id = frame.get("conversationId") or frame.get("conversation_id") or "default"
    if not isinstance(conversation_id, str):
        return None
    payload: Frame = {"kind": "create_message", "messages": messages}
    for legacy, current in (
        ("clientToolAllowlist", "client_tool_allowlist"),
        ("clientToolset", "client_toolset"),
        ("externalToolScopeIds", "external_tool_scope_ids"),
    ):
        if legacy in frame:
            payload[current] = frame[legacy]
    return {
        "type": "input",
        "runtime": {"agent_id": agent_id, "conversation_id": conversation_id},
        "payload": payload,
    }


def message_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                str(item.get("text", ""))
                for item in content
                if isinstance(item, Mapping) and item.get("type") == "text"
            )
    return " ".join(part for part in parts if part)


def arrived_message(frame: Mapping[str, Any], limit: int = 80) -> str | None:
    """A one-line description of a user message a command carries (REST's `message`, or an `input`
    that creates one), for the device's log; None for any other command."""
    if frame.get("type") == "message":
        converted = legacy_message_to_input(frame)
        if converted is None:
            return None
        frame = converted
    payload = frame.get("payload")
    scope = parse_scope(frame.get("runtime"))
    if frame.get("type") != "input" or scope is None or not isinstance(payload, Mapping):
        return None
    messages = payload.get("messages")
    if payload.get("kind") != "create_message" or not isinstance(messages, list):
        return None
    text = message_text(messages)
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"Message for {scope.agent_id}/{scope.conversation_id}: {shown!r}"


def first_client_message_id(messages: list[Any]) -> str | None:
    for message in messages:
        if isinstance(message, Mapping):
            value = message.get("client_message_id")
            return value if isinstance(value, str) and value else None
    return None


def chunk_text(text: str, pieces: int) -> list[str]:
    words = text.split(" ")
    size = max(1, -(-len(words) // max(1, pieces)))
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    # Re-join with the separating spaces so that the chunks concatenate back to `text`.
    return [chunk if i == 0 else " " + chunk for i, chunk in enumerate(chunks)]


def _remember(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > DEDUPE_KEYS_KEPT:
        store.popitem(last=False)


class Behaviour:
    """Conversation state of one device runtime (one registration)."""

    def __init__(
        self,
        settings: DeviceSettings,
        *,
        connection_id: str | None = None,
        turn_delay: float = 0.01,
        reply_chunks: int = 4,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.connection_id = connection_id
        self.turn_delay = turn_delay
        self.reply_chunks = reply_chunks
        self._now = now
        self._conversations: dict[Scope, Conversation] = {}
        self._handlers: dict[str, Callable[[Frame], Reaction]] = {
            "input": self._on_input,
            "message": self._on_legacy_message,
            "sync": self._on_sync,
            "runtime_start": self._on_runtime_start,
            "abort_message": self._on_abort,
            "change_device_state": self._on_change_device_state,
            "remove_queue_item": self._on_remove_queue_item,
            "app_server_info": self._on_app_server_info,
            "teleport_probe": self._on_teleport_probe,
            "teleport_request": self._on_teleport_request,
            "teleport_failed": self._on_teleport_failed,
            "bench_stream": self._on_bench_stream,
        }

    # -- entry points -------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> Reaction:
        kind = frame.get("type")
        if not isinstance(kind, str):
            return Reaction()
        handler = self._handlers.get(kind)
        if handler is not None:
            return handler(frame)
        scope = parse_scope(frame.get("runtime")) if kind in SCOPED_COMMANDS else None
        return Reaction(subscribe=scope)

    def snapshot(self, scope: Scope, *, full: bool = True, force_status: bool = False) -> list[Output]:
        """State replayed for a scope: all on `sync` (§3.5), only the two statuses on reconnect (§3.9)."""
        outputs: list[Output] = [self.device_status(scope, force=force_status), self.loop_status(scope)]
        if full:
            conversation = self._conversations.get(scope)
            queue = [item.wire() for item in conversation.queue] if conversation is not None else []
            outputs.append(Event({"type": "update_queue", "queue": queue, "removed": []}, scope))
            outputs.append(Event({"type": "update_subagent_state", "subagents": []}, scope))
        return outputs

    def scopes(self) -> list[Scope]:
        return list(self._conversations)

    def device_status(self, scope: Scope, *, force: bool = False) -> Event:
        conversation = self._conversations.get(scope)
        settings = self.settings
        status = {
            "current_connection_id": self.connection_id,
            "connection_name": settings.name,
            "is_online": True,
            "is_processing": bool(conversation and conversation.busy),
            "current_permission_mode": settings.mode,
            "current_working_directory": settings.cwd,
            "git_context": {"branch": settings.branch, "recent_branches": [settings.branch]},
            "letta_code_version": settings.version,
            "current_toolset": "default",
            "current_toolset_preference": "auto",
            "current_loaded_tools": [],
            "current_available_skills": [],
            "background_processes": [],
            "pending_control_requests": [],
            "experiments": [],
            "memory_directory": None,
            "reflection_settings": {"trigger": "off", "step_count": 0},
            "supported_commands": list(SUPPORTED_COMMANDS),
        }
        return Event({"type": "update_device_status", "device_status": status}, scope, force)

    def loop_status(self, scope: Scope, status: str | None = None) -> Event:
        conversation = self._conversations.get(scope)
        run_id = conversation.run_id if conversation is not None else None
        if status is None:
            status = "PROCESSING_API_RESPONSE" if conversation and conversation.busy else "WAITING_ON_INPUT"
        loop = {
            "status": status,
            "active_run_ids": [run_id] if run_id else [],
            "executing_tool_call_ids": [],
        }
        return Event({"type": "update_loop_status", "loop_status": loop}, scope)

    # -- chat ---------------------------------------------------------------------------------------

    def _conversation(self, scope: Scope) -> Conversation:
        conversation = self._conversations.get(scope)
        if conversation is None:
            conversation = self._conversations[scope] = Conversation(scope)
        return conversation

    def _on_legacy_message(self, frame: Frame) -> Reaction:
        converted = legacy_message_to_input(frame)
        return self._on_input(converted) if converted is not None else Reaction()

    def _on_input(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        if scope is None:
            return Reaction()
        request_id = frame.get("request_id")
        if request_id is not None and not (isinstance(request_id, str) and request_id):
            return self._protocol_violation(scope, "input.request_id must be a non-empty string")
        payload = frame.get("payload")
        kind = payload.get("kind") if isinstance(payload, Mapping) else None
        if kind == "create_message" and isinstance(payload, Mapping):
            messages = payload.get("messages")
            if not isinstance(messages, list):
                return self._protocol_violation(scope, "create_message.messages must be an array")
            return self._create_message(scope, request_id, messages)
        if kind == "teleport_continue" and isinstance(payload, Mapping):
            return self._teleport_continue(scope, request_id, payload)
        if kind == "approval_response":
            # This device never asks for approval, so there is nothing an approval could answer.
            reaction = Reaction(subscribe=scope)
            if request_id:
                reaction.outputs.append(
                    self._input_accepted(scope, request_id, False, error="No pending approval request")
                )
            return reaction
        return self._protocol_violation(scope, f"unsupported input payload kind {kind!r}")

    def _protocol_violation(self, scope: Scope, detail: str) -> Reaction:
        notice = self._lifecycle_delta("loop_error", message=f"Protocol violation: {detail}")
        return Reaction([Event(notice, scope)], subscribe=scope)

    def _input_accepted(
        self,
        scope: Scope,
        request_id: str,
        accepted: bool,
        *,
        disposition: str | None = None,
        error: str | None = None,
    ) -> Reply:
        frame: Frame = {
            "type": "input_accepted",
            "request_id": request_id,
            "runtime": scope.wire(),
            "accepted": accepted,
        }
        if disposition is not None:
            frame["disposition"] = disposition
        if error is not None:
            frame["error"] = error
        return Reply(frame)

    def _create_message(self, scope: Scope, request_id: str | None, messages: list[Any]) -> Reaction:
        conversation = self._conversation(scope)
        reaction = Reaction(subscribe=scope)
        key = first_client_message_id(messages)
        if key is not None and key in conversation.dispositions:
            # A retried delivery: acknowledge it the same way and do not run it again.
            if request_id:
                reaction.outputs.append(
                    self._input_accepted(scope, request_id, True, disposition=conversation.dispositions[key])
                )
            return reaction
        if self._switching(conversation):
            if request_id:
                reaction.outputs.append(
                    self._input_accepted(scope, request_id, False, error=TELEPORT_SWITCHING_ERROR)
                )
            return reaction
        item = QueuedInput(f"queue-{uuid.uuid4()}", key, message_text(messages), iso_now(self._now()))
        disposition = "queued" if conversation.busy else "started"
        if key is not None:
            _remember(conversation.dispositions, key, disposition)
        if request_id:
            reaction.outputs.append(self._input_accepted(scope, request_id, True, disposition=disposition))
        if conversation.busy:
            conversation.queue.append(item)
            reaction.outputs.append(self._queue_update(conversation, removed=[]))
        else:
            conversation.busy = True
            reaction.job = self._drain(conversation, f"Echo from {self.settings.name}: {item.text}", item)
        return reaction

    def _drain(self, conversation: Conversation, reply: str, item: QueuedInput | None) -> Job:
        """Run one turn, then every input queued behind it, then answer a teleport that was waiting."""
        while True:
            yield from self._turn(conversation, reply, item)
            if not conversation.queue:
                break
            item = conversation.queue.popleft()
            reply = f"Echo from {self.settings.name}: {item.text}"
            removed = [{"client_message_id": item.client_message_id, "disposition": "dequeued"}]
            yield self._queue_update(conversation, removed=removed)
        conversation.busy = False
        waiting = self._unready_teleport(conversation)
        if waiting is not None:
            yield self._teleport_ready(conversation, waiting)

    def _turn(self, conversation: Conversation, reply: str, item: QueuedInput | None) -> Job:
        scope = conversation.scope
        run_id = f"run-{uuid.uuid4()}"
        conversation.busy = True
        conversation.run_id = run_id
        sending = self.loop_status(scope, "SENDING_API_REQUEST")
        if item is not None and item.client_message_id:
            sending.frame["loop_status"]["client_message_ids_by_run_id"] = {run_id: [item.client_message_id]}
        yield sending
        yield Pause(self.turn_delay)
        message_id = f"message-{uuid.uuid4()}"
        otid = str(uuid.uuid4())
        for chunk in chunk_text(reply, self.reply_chunks):
            if conversation.cancel_requested:
                break
            delta = {
                "type": "message",
                "message_type": "assistant_message",
                "id": message_id,
                "otid": otid,
                "date": iso_now(self._now()),
                "run_id": run_id,
                "content": chunk,
            }
            yield Event({"type": "stream_delta", "delta": delta}, scope)
            yield Pause(self.turn_delay)
        stop_reason = "cancelled" if conversation.cancel_requested else "end_turn"
        stop = {
            "type": "message",
            "message_type": "stop_reason",
            "stop_reason": stop_reason,
            "run_id": run_id,
        }
        yield Event({"type": "stream_delta", "delta": stop}, scope)
        conversation.run_id = None
        conversation.cancel_requested = False
        yield self.loop_status(scope, "WAITING_ON_INPUT")
        finished = {
            "type": "turn_finished",
            "turn_id": f"turn-{uuid.uuid4()}",
            "stop_reason": stop_reason,
            "run_id": run_id,
        }
        yield Event(finished, scope)

    def _queue_update(self, conversation: Conversation, *, removed: list[Frame]) -> Event:
        frame = {
            "type": "update_queue",
            "queue": [item.wire() for item in conversation.queue],
            "removed": removed,
        }
        return Event(frame, conversation.scope)

    def _lifecycle_delta(self, message_type: str, **fields: Any) -> Frame:
        delta = {
            "id": f"delta-{uuid.uuid4()}",
            "date": iso_now(self._now()),
            "message_type": message_type,
            **fields,
        }
        return {"type": "stream_delta", "delta": delta}

    def _on_sync(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        if scope is None:
            return Reaction()
        force = frame.get("force_device_status") is True
        reaction = Reaction(self.snapshot(scope, force_status=force), subscribe=scope)
        request_id = frame.get("request_id")
        if isinstance(request_id, str) and request_id:
            response = {
                "type": "sync_response",
                "request_id": request_id,
                "runtime": scope.wire(),
                "success": True,
            }
            reaction.outputs.append(Reply(response))
        return reaction

    def _on_runtime_start(self, frame: Frame) -> Reaction:
        request_id = frame.get("request_id")
        if not (isinstance(request_id, str) and request_id):
            return Reaction()
        agent_id = frame.get("agent_id")
        created_agent = False
        if not (isinstance(agent_id, str) and agent_id):
            if not isinstance(frame.get("create_agent"), Mapping):
                response = {
                    "type": "runtime_start_response",
                    "request_id": request_id,
                    "success": False,
                    "runtime": None,
                    "agent": None,
                    "conversation": None,
                    "created": {"agent": False, "conversation": False},
                    "error": "agent_id or create_agent is required",
                }
                return Reaction([Reply(response)])
            agent_id, created_agent = f"agent-{uuid.uuid4()}", True
        conversation_id = frame.get("conversation_id")
        created_conversation = False
        if not (isinstance(conversation_id, str) and conversation_id):
            if isinstance(frame.get("create_conversation"), Mapping):
                conversation_id, created_conversation = f"conv-{uuid.uuid4()}", True
            else:
                conversation_id = "default"
        if (mode := normalize_mode(frame.get("mode"))) is not None:
            self.settings.mode = mode
        if isinstance(cwd := frame.get("cwd"), str) and cwd:
            self.settings.cwd = cwd
        scope = Scope(agent_id, conversation_id)
        self._conversation(scope)
        response = {
            "type": "runtime_start_response",
            "request_id": request_id,
            "success": True,
            "runtime": scope.wire(),
            "agent": {"id": agent_id, "name": f"{self.settings.name} agent"},
            "conversation": {"id": conversation_id, "agent_id": agent_id},
            "created": {"agent": created_agent, "conversation": created_conversation},
        }
        force = frame.get("force_device_status") is True
        return Reaction(
            [*self.snapshot(scope, full=False, force_status=force), Reply(response)], subscribe=scope
        )

    def _on_abort(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        if scope is None:
            return Reaction()
        conversation = self._conversations.get(scope)
        # `busy` rather than `run_id`: an abort may land before the turn's job has taken its first step.
        aborted = bool(conversation and conversation.busy and not conversation.cancel_requested)
        if aborted and conversation is not None:
            conversation.cancel_requested = True
        reaction = Reaction(subscribe=scope)
        request_id = frame.get("request_id")
        if isinstance(request_id, str) and request_id:
            response = {
                "type": "abort_message_response",
                "request_id": request_id,
                "runtime": scope.wire(),
                "aborted": aborted,
                "success": True,
            }
            reaction.outputs.append(Reply(response))
        return reaction

    def _on_change_device_state(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        payload = frame.get("payload")
        if scope is None or not isinstance(payload, Mapping):
            return Reaction()
        mode = payload.get("mode")
        if mode is not None and normalize_mode(mode) is None:
            return Reaction()  # fails validation, so the real device drops the whole frame
        conversation = self._conversation(scope)
        reaction = Reaction(subscribe=scope)
        idle = not conversation.busy
        if idle:
            reaction.outputs.append(self.loop_status(scope, "EXECUTING_COMMAND"))
        if (normalized := normalize_mode(mode)) is not None:
            self.settings.mode = normalized
        if isinstance(cwd := payload.get("cwd"), str) and cwd:
            self.settings.cwd = cwd
        reaction.outputs.append(self.device_status(scope))
        if idle:
            reaction.outputs.append(self.loop_status(scope, "WAITING_ON_INPUT"))
        return reaction

    def _on_remove_queue_item(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        request_id = frame.get("request_id")
        item_id = frame.get("item_id")
        if scope is None or not isinstance(request_id, str) or not isinstance(item_id, str):
            return Reaction()
        conversation = self._conversation(scope)
        found = next((item for item in conversation.queue if item.id == item_id), None)
        response = {
            "type": "remove_queue_item_response",
            "request_id": request_id,
            "success": found is not None,
            "item_id": item_id,
        }
        reaction = Reaction([Reply(response)], subscribe=scope)
        if found is not None:
            conversation.queue.remove(found)
            removed = [{"client_message_id": found.client_message_id, "disposition": "cancelled"}]
            reaction.outputs.append(self._queue_update(conversation, removed=removed))
        return reaction

    # -- settings -----------------------------------------------------------------------------------

    def _on_app_server_info(self, frame: Frame) -> Reaction:
        request_id = frame.get("request_id")
        if not (isinstance(request_id, str) and request_id):
            return Reaction()
        response = {
            "type": "app_server_info_response",
            "request_id": request_id,
            "success": True,
            "backend": "api",
            "letta_code_version": self.settings.version,
            "protocol_version": 1,
            "capabilities": {
                "agent_management": True,
                "conversation_management": True,
                "memory_management": True,
                "runtime_start": True,
                "split_channels": False,
            },
        }
        return Reaction([Reply(response)])

    # -- teleport (§6.2) ----------------------------------------------------------------------------

    def _prune_teleports(self, conversation: Conversation) -> None:
        # Answered teleports are remembered for TELEPORT_MEMORY_SECONDS, as the real device does.
        now = self._now()
        for teleport_id, teleport in list(conversation.teleports.items()):
            if teleport.ready_at is not None and now - teleport.ready_at >= TELEPORT_MEMORY_SECONDS:
                del conversation.teleports[teleport_id]

    def _unready_teleport(self, conversation: Conversation) -> Teleport | None:
        return next((t for t in conversation.teleports.values() if t.ready is None), None)

    def _switching(self, conversation: Conversation) -> bool:
        """Whether inputs are refused because the conversation is moving to another computer."""
        self._prune_teleports(conversation)
        return any(teleport.error is None for teleport in conversation.teleports.values())

    def _teleport_ready(
        self, conversation: Conversation, teleport: Teleport, *, error: str | None = None
    ) -> Event:
        frame: Frame = {"type": "teleport_ready", "teleport_id": teleport.teleport_id}
        if error is None:
            frame.update(success=True, active_turn=False, mode=self.settings.mode)
        else:
            frame.update(success=False, active_turn=False, error=error)
        teleport.ready, teleport.ready_at, teleport.error = frame, self._now(), error
        return Event(dict(frame), conversation.scope)

    def _on_teleport_probe(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        request_id = frame.get("request_id")
        if scope is None or not (isinstance(request_id, str) and request_id):
            return Reaction()
        response = {
            "type": "teleport_probe_response",
            "request_id": request_id,
            "runtime": scope.wire(),
            "supported": True,
            "drains_accepted_inputs": True,
            "idempotent_continuation": True,
        }
        return Reaction([Reply(response)], subscribe=scope)

    def _on_teleport_request(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        teleport_id = frame.get("teleport_id")
        target = frame.get("target")
        if (
            scope is None
            or not isinstance(frame.get("request_id"), str)
            or not isinstance(teleport_id, str)
            or not isinstance(target, Mapping)
            or not all(
                isinstance(target.get(key), str) for key in ("connection_id", "device_id", "connection_name")
            )
        ):
            return Reaction()
        conversation = self._conversation(scope)
        self._prune_teleports(conversation)
        reaction = Reaction(subscribe=scope)
        existing = conversation.teleports.get(teleport_id)
        if existing is not None:
            # Idempotent: repeat the answer if there was one, otherwise it is still coming.
            if existing.ready is not None:
                reaction.outputs.append(Event(dict(existing.ready), scope))
            return reaction
        teleport = Teleport(teleport_id)
        # Only a teleport still waiting for its turn boundary conflicts; once answered, a new one may follow.
        conflicting = self._unready_teleport(conversation) is not None
        conversation.teleports[teleport_id] = teleport
        if conflicting:
            reaction.outputs.append(
                self._teleport_ready(conversation, teleport, error=TELEPORT_PENDING_ERROR)
            )
        elif not conversation.busy and not conversation.queue:
            reaction.outputs.append(self._teleport_ready(conversation, teleport))
        # Otherwise `_drain` answers once the turn and the queue behind it finish.
        return reaction

    def _on_teleport_failed(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        teleport_id = frame.get("teleport_id")
        error = frame.get("error")
        if scope is None or not isinstance(teleport_id, str) or not isinstance(error, str):
            return Reaction()
        conversation = self._conversation(scope)
        reaction = Reaction(subscribe=scope)
        teleport = conversation.teleports.pop(teleport_id, None)
        if teleport is None or teleport.error is not None:
            return reaction
        notice = self._lifecycle_delta(
            "loop_error", message=f"Teleport failed: {error}", stop_reason="error", is_terminal=False
        )
        reaction.outputs.append(Event(notice, scope))
        # The source resumes the conversation locally with a short continuation turn.
        if not conversation.busy:
            conversation.busy = True
            reply = "The teleport failed, so I am continuing on this computer."
            reaction.job = self._drain(conversation, reply, None)
        return reaction

    def _teleport_continue(
        self, scope: Scope, request_id: str | None, payload: Mapping[str, Any]
    ) -> Reaction:
        teleport_id = payload.get("teleport_id")
        if not (isinstance(teleport_id, str) and teleport_id):
            return self._protocol_violation(scope, "teleport_continue.teleport_id must be a non-empty string")
        conversation = self._conversation(scope)
        reaction = Reaction(subscribe=scope)
        if teleport_id in conversation.continued_teleports:
            if request_id:
                reaction.outputs.append(self._input_accepted(scope, request_id, True, disposition="started"))
            return reaction
        if conversation.busy:
            if request_id:
                reaction.outputs.append(
                    self._input_accepted(scope, request_id, False, error=DESTINATION_BUSY_ERROR)
                )
            return reaction
        _remember(conversation.continued_teleports, teleport_id, None)
        if request_id:
            reaction.outputs.append(self._input_accepted(scope, request_id, True, disposition="started"))
        source = payload.get("source")
        origin = source.get("connection_name") if isinstance(source, Mapping) else None
        conversation.busy = True
        reaction.job = self._drain(
            conversation, f"Continuing here after teleport from {origin or 'another computer'}.", None
        )
        return reaction

    # -- benchmark ----------------------------------------------------------------------------------

    def _on_bench_stream(self, frame: Frame) -> Reaction:
        scope = parse_scope(frame.get("runtime"))
        request_id = frame.get("request_id")
        count = frame.get("count")
        size = frame.get("size", 64)
        if (
            scope is None
            or not (isinstance(request_id, str) and request_id)
            or not isinstance(count, int)
            or not isinstance(size, int)
            or count < 0
            or size < 0
        ):
            return Reaction()
        return Reaction(subscribe=scope, job=self._bench_stream(scope, request_id, count, size))

    def _bench_stream(self, scope: Scope, request_id: str, count: int, size: int) -> Job:
        run_id = f"run-{uuid.uuid4()}"
        content = "x" * size
        for index in range(count):
            delta = {
                "type": "message",
                "message_type": "assistant_message",
                "id": f"message-{run_id}-{index}",
                "date": iso_now(self._now()),
                "run_id": run_id,
                "content": content,
            }
            yield Event({"type": "stream_delta", "delta": delta}, scope)
        response = {
            "type": "bench_stream_response",
            "request_id": request_id,
            "runtime": scope.wire(),
            "success": True,
            "count": count,
        }
        yield Reply(response)
