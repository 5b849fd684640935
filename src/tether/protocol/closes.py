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

# ---- relay (client) sockets ----------------------------------------------------------------
DEVICE_OFFLINE = 1001  # the environment was declared offline: final
SLOW_CONSUMER = 4008  # the client did not read fast enough; it may resume

# Closes after which a relay client will not come back for its history.
RELAY_FINAL = frozenset({1000, DEVICE_OFFLINE})
