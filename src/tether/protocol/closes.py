"""Every WebSocket close code the router sends, with what the peer does on it (README "Close codes").

Devices act on the code (device-protocol §3.3): 1008 makes the device re-register, 1000 with
`REPLACED_REASON` makes it stop, everything else is transient (it reconnects with back-off).
Relay clients treat 1000 and 1001 as final and anything else as a reason to resume.
"""

from __future__ import annotations

# ---- device sockets ------------------------------------------------------------------------
REPLACED = 1000  # with REPLACED_REASON: a newer registration took the slot; the process stops
REPLACED_REASON = "Replaced by new connection"
LEASE_UNKNOWN = 1008  # unknown, expired or deleted lease, or a bad key: the device re-registers
DRAIN = 1012  # this pod is shutting down: reconnect (to another pod)
TRY_AGAIN_LATER = 1013  # the key could not be checked (upstream-keys mode, Letta server away)
SUPERSEDED = 4000  # a newer socket of the same device took over (also: reconnected through another pod)
STALE_GENERATION = 4001  # a delayed socket of an older connection attempt
GENERATION_MISMATCH = 4002  # a stream socket that matches no current control socket
PARTNER_LOST = 4003  # the other socket of the pair closed
HEARTBEAT_TIMEOUT = 4004  # no ping within the offline window
OPERATOR_DISCONNECT = 4005  # POST /v1/tether/environments/{id}/disconnect: transient, the device reconnects
READY_TIMEOUT = 4006  # a control socket whose pair was not complete within TETHER_READY_TIMEOUT_SECONDS
BAD_HELLO = 4400  # invalid channel / connectionGeneration / connectionAttempt query

# ---- either socket: input that is not a WebSocket message we take (RFC 6455 §7.4.1) ---------
# Sent by the WebSocket layer (websockets, under uvicorn), not by the router's code. Input that is a
# message but not a frame we know (not JSON, not an object with a string `type`, a binary message that
# is not one) is no protocol error: a device socket drops it, a relay socket answers a
# `malformed_frame` error, and the socket lives on. Binary messages are read like text (devices do
# the same, device-protocol §3.1), so 1003 (unsupported data) is never sent.
PROTOCOL_ERROR = 1002  # a framing violation: reserved bits or opcodes, an unmasked client frame, a bad
#                        continuation, a control frame over 125 bytes or fragmented
INVALID_UTF8 = 1007  # a text message that is not UTF-8
MESSAGE_TOO_BIG = 1009  # a message over TETHER_MAX_FRAME_BYTES (its fragments counted together)

# ---- relay (client) sockets ----------------------------------------------------------------
DEVICE_OFFLINE = 1001  # the environment was declared offline: final
SLOW_CONSUMER = 4008  # the client did not read fast enough; it may resume

# Closes after which a relay client will not come back for its history.
RELAY_FINAL = frozenset({1000, DEVICE_OFFLINE})
