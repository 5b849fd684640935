"""Gateway mode: Tether in front of a real Letta server, so one base URL serves devices and agents.

Tether keeps its own routes (environments, console, fleet API, metrics, health) and forwards every other
request to the upstream named by `TETHER_LETTA_URL`, streaming both bodies. The parts: `routes` (which
paths stay here), `headers` (what is forwarded), `upstream` (the pooled client and its failures),
`actors` (a Tether organization's identity on the upstream) and `credentials` (upstream keys as
Tether principals). The ASGI edge that ties them to a request is `tether.api.gateway`.
"""
