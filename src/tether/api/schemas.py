"""Wire shapes of the REST API, named and typed as the Letta Environments API (for OpenAPI and validation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 512
MAX_NAME = 1024
MAX_MESSAGES = 100


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class EnvironmentMetadata(_Open):
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
    currentMode: Literal["default", "standard", "acceptEdits", "bypassPermissions", "unrestricted"] | None = None
    metadata: EnvironmentMetadata | None = None


class EnvironmentList(BaseModel):
    connections: list[EnvironmentConnection]
    hasNextPage: bool


class RegisterRequest(_Open):
    deviceId: str = Field(min_length=1, max_length=MAX_ID)
    listenerInstanceId: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    connectionName: str = Field(min_length=1, max_length=MAX_NAME)
    metadata: dict[str, Any] | None = None


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
    client_message_id: str = Field(min_length=1, max_length=MAX_ID)
    otid: str | None = None


class ApprovalMessage(_Open):
    type: Literal["approval"]
    approvals: list[dict[str, Any]] = Field(min_length=1)


class SendMessageRequest(_Open):
    messages: list[UserMessage | ApprovalMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    agentId: str = Field(min_length=1, max_length=MAX_ID)
    conversationId: str | None = Field(default=None, max_length=MAX_ID)


class SendMessageResponse(BaseModel):
    success: bool
    message: str


class TeleportRequest(_Open):
    targetConnectionId: str = Field(min_length=1, max_length=MAX_ID)
    idempotencyKey: str | None = Field(default=None, min_length=1, max_length=256)
    sourceConnectionId: str | None = Field(
        default=None, max_length=MAX_ID, description="Tether extension: the environment running the conversation."
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
