"""Wire shapes of the REST API, named and typed as the Letta Environments API (for OpenAPI and validation)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 512
MAX_NAME = 1024
MAX_MESSAGES = 100
# Largest integer a query parameter takes: the largest a JSON number holds exactly (JavaScript's
# Number.MAX_SAFE_INTEGER), so a sequence number or offset is echoed back as it came.
MAX_COUNT = 2**53 - 1
# Identifiers end up in text columns, and PostgreSQL text cannot hold NUL.
NO_NUL = r"^[^\x00]*$"


def documented(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """`json_schema_extra` for a query parameter taken as text and parsed by hand (for its own
    error code): OpenAPI shows what the parser accepts (`{"type": "integer", "maximum": 500}`), not
    "any string", so clients and fuzzers know which values are valid."""

    def apply(generated: dict[str, Any]) -> None:
        kept = {k: generated[k] for k in ("title", "description") if k in generated}
        generated.clear()
        generated.update(kept | schema)

    return apply


_TEMPLATE = re.compile(r"\{([^}]+)\}")


def merge_identical_paths(paths: dict[str, Any]) -> dict[str, Any]:
    """One path item per URL shape. `DELETE /v1/environments/{environmentId}` and
    `GET /v1/environments/{deviceId}` are one URL with two methods, but OpenAPI forbids two templates
    that differ only in their names: clients and fuzzers would see two resources, each with one
    method. Merged, the template's name joins both (`{environmentIdOrDeviceId}`) and each operation
    keeps its own parameter description."""
    merged: dict[str, dict[str, Any]] = {}  # URL shape ("/a/{}") -> (template names, path item)
    for path, item in paths.items():
        shape, ours = _TEMPLATE.sub("{}", path), _TEMPLATE.findall(path)
        if shape not in merged:
            merged[shape] = {"names": ours, "item": item}
            continue
        kept = merged[shape]
        joined = [
            a if a == b else f"{a}Or{b[:1].upper()}{b[1:]}" for a, b in zip(kept["names"], ours, strict=True)
        ]
        renamed = dict(zip(kept["names"], joined, strict=True)) | dict(zip(ours, joined, strict=True))
        kept["names"], kept["item"] = joined, {**kept["item"], **item}
        for operation in kept["item"].values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path":
                    parameter["name"] = renamed.get(parameter["name"], parameter["name"])
    return {shape.format(*(f"{{{n}}}" for n in v["names"])): v["item"] for shape, v in merged.items()}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class EnvironmentMetadata(_Open):
    """Open object; these keys, when present, are strings (clients validate them as such)."""

    lettaCodeVersion: str | None = None
    os: str | None = None
    nodeVersion: str | None = None
    workingDirectory: str | None = None
    gitBranch: str | None = None


class EnvironmentConnection(BaseModel):
    id: str
    connectionId: str | None = Field(description="Current lease; null while offline.")
    connectionName: str
    deviceId: str
    listenerInstanceId: str | None = None
    organizationId: str
    userId: str | None = None
    apiKeyOwner: str | None = None
    podId: str | None = Field(description="Router pod holding the device socket; null while offline.")
    connectedAt: int | None = Field(description="Epoch ms when the current socket connected.")
    lastHeartbeat: int | None = Field(description="Epoch ms of the last device ping.")
    lastSeenAt: int = Field(description="Epoch ms of the last activity.")
    firstSeenAt: int = Field(description="Epoch ms of the first registration of this slot.")
    currentMode: Literal["default", "standard", "acceptEdits", "bypassPermissions", "unrestricted"] | None = (
        None
    )
    metadata: EnvironmentMetadata | None = None


class EnvironmentList(BaseModel):
    connections: list[EnvironmentConnection]
    hasNextPage: bool


class RegisterRequest(_Open):
    deviceId: str = Field(min_length=1, max_length=MAX_ID, pattern=NO_NUL)
    listenerInstanceId: str | None = Field(default=None, min_length=1, max_length=MAX_ID, pattern=NO_NUL)
    connectionName: str = Field(min_length=1, max_length=MAX_NAME, pattern=NO_NUL)
    metadata: EnvironmentMetadata | None = Field(
        default=None, description="Stored and returned verbatim (at most 64 KiB as JSON)."
    )


class RegisterResponse(BaseModel):
    connectionId: str
    wsUrl: str
    supportsSplitStatusChannels: bool
    supportsPairedListenerGenerations: bool


class TextPart(_Open):
    type: str
    text: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: str | list[TextPart]
    client_message_id: str = Field(min_length=1, max_length=MAX_ID, pattern=NO_NUL)
    otid: str | None = None


class ApprovalMessage(_Open):
    type: Literal["approval"]
    approvals: list[dict[str, Any]] = Field(min_length=1)


class SendMessageRequest(_Open):
    messages: list[UserMessage | ApprovalMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    agentId: str = Field(min_length=1, max_length=MAX_ID, pattern=NO_NUL)
    conversationId: str | None = Field(default=None, max_length=MAX_ID, pattern=NO_NUL)


class SendMessageResponse(BaseModel):
    success: bool
    message: str


class TeleportRequest(_Open):
    targetConnectionId: str = Field(min_length=1, max_length=MAX_ID, pattern=NO_NUL)
    idempotencyKey: str | None = Field(default=None, min_length=1, max_length=256, pattern=NO_NUL)
    sourceConnectionId: str | None = Field(
        default=None,
        max_length=MAX_ID,
        pattern=NO_NUL,
        description="Tether extension: the environment running the conversation.",
    )


class TeleportResponse(BaseModel):
    id: str
    agentId: str
    conversationId: str
    sourceConnectionId: str
    targetConnectionId: str
    targetDeviceId: str
    targetConnectionName: str
    status: Literal["waiting_for_source", "starting_destination", "completed", "failed"]
    error: str | None
    createdAt: int
    updatedAt: int


class ErrorBody(BaseModel):
    errorCode: str
    message: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    detail: str = Field(description="ok, or what this pod waits for.")
    waiting: list[str] = Field(
        default_factory=list, description='Services start-up still waits for: "database", "redis".'
    )
