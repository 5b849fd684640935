"""Which relay sockets of one connection get a device frame, and as what text (client-protocol §2.4).

Pure: sockets are opaque members with a scope, a channel and a key. A reply (a frame with a
`request_id` and no `event_seq`) goes to the pair that asked and only to it; the router's own
requests' replies go to nobody; every other frame goes to each scope it matches, renumbered per
feed (`feeds.py`), with a device-side loss counted once for all feeds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

from tether.protocol.feeds import Feed, Scope
from tether.protocol.frames import Frame

# The router's own requests (scope subscriptions) remembered per connection; their answers are
# not relayed. Bounded: a device that never answers cannot grow it.
INTERNAL_REQUESTS_PER_CONNECTION = 1024
# Every pod's own requests start so: a reply to another pod's is not relayed either (its sockets
# never asked), and a resume replaying the event log elsewhere routes exactly as this pod did.
INTERNAL_REQUEST_PREFIX = "tether-sub-"
REQUEST_ROUTES_PER_CONNECTION = 10_000


class Member(Protocol):
    @property
    def scope(self) -> Scope: ...
    @property
    def channel(self) -> str | None: ...
    @property
    def key_id(self) -> str: ...


M = TypeVar("M", bound=Member)


class BoundedSet:
    """A set that forgets its oldest members past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, None] = OrderedDict()

    def add(self, item: str) -> None:
        self._items[item] = None
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items


class Fanout(Generic[M]):
    def __init__(self) -> None:
        self.feeds: dict[Scope, Feed] = {}
        self._members: dict[Scope, set[M]] = {}
        self._all: set[M] = set()
        self._partner: dict[M, M] = {}
        self._requests: OrderedDict[str, M] = OrderedDict()
        self._internal = BoundedSet(INTERNAL_REQUESTS_PER_CONNECTION)
        self.losses = 0

    def __contains__(self, member: object) -> bool:
        return member in self._all

    def __len__(self) -> int:
        return len(self._all)

    def scopes(self) -> list[Scope]:
        return list(self.feeds)

    def add(self, member: M) -> bool:
        """Add a member; True when its scope is new here (the device should be subscribed to it)."""
        fresh = member.scope not in self.feeds
        if fresh:
            self.feeds[member.scope] = Feed(member.scope)
            self._members[member.scope] = set()
        self._members[member.scope].add(member)
        self._all.add(member)
        self._pair(member)
        return fresh

    def remove(self, member: M) -> None:
        self._all.discard(member)
        members = self._members.get(member.scope)
        if members is not None:
            members.discard(member)
            if not members:
                del self._members[member.scope]
                del self.feeds[member.scope]
        partner = self._partner.pop(member, None)
        if partner is not None:
            self._partner.pop(partner, None)

    def clear(self) -> None:
        self.feeds.clear()
        self._members.clear()
        self._all.clear()
        self._partner.clear()
        self._requests.clear()

    def partner(self, member: M) -> M | None:
        return self._partner.get(member)

    def _pair(self, member: M) -> None:
        """Agent-SDK clients open a control and a stream socket with the same scope: bind them."""
        if member.channel not in ("control", "stream"):
            return
        wanted = "stream" if member.channel == "control" else "control"
        for other in self._members[member.scope]:
            if other not in self._partner and other.channel == wanted and other.key_id == member.key_id:
                self._partner[other], self._partner[member] = member, other
                return

    def remember_request(self, request_id: str, member: M) -> None:
        self._requests[request_id] = member
        self._requests.move_to_end(request_id)
        while len(self._requests) > REQUEST_ROUTES_PER_CONNECTION:
            self._requests.popitem(last=False)

    def internal_request(self, request_id: str) -> None:
        """A request of the router's own: its reply is relayed to no one."""
        self._internal.add(request_id)

    def route(self, frame: Frame, gap_before: bool) -> list[tuple[M, str]]:
        """Each member that gets `frame`, with the text it gets (before its own `seq`)."""
        if gap_before:
            self.losses += 1
        if frame.request_id is not None and frame.event_seq is None:
            if frame.request_id in self._internal:
                return []
            sender = self._requests.get(frame.request_id)
            if sender is not None and sender in self._all:
                partner = self._partner.get(sender)
                if partner is None:
                    return [(sender, frame.text)]
                return [(sender, frame.text), (partner, frame.text)]
            if frame.request_id.startswith(INTERNAL_REQUEST_PREFIX):
                return []  # another pod's own request (or a client's elsewhere, answered there)
        out: list[tuple[M, str]] = []
        for scope, feed in self.feeds.items():
            if scope.matches(frame):
                text = feed.text_for(frame, self.losses)
                out.extend((member, text) for member in self._members[scope])
        return out
