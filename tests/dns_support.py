"""A registry and the DNS answers it feeds, wired as the server wires them (no sockets)."""

from __future__ import annotations

from collections.abc import Iterable

from discovery.dns.answers import Answers, AnswerState, DnsSettings
from discovery.dns.resolver import Resolver
from discovery.registry import Registry
from discovery.store.base import Event, Snapshot


class DnsCache:
    def __init__(self, settings: DnsSettings, prefix: str) -> None:
        self.registry = Registry(prefix)
        self.answers = Answers(settings)
        self.registry.subscribe(self.answers)

    def load(self, snapshot: Snapshot) -> None:
        self.registry.load(snapshot)

    def apply(self, events: Iterable[Event]) -> None:
        self.registry.apply(events)

    @property
    def state(self) -> AnswerState:
        return self.answers.state

    @property
    def synced(self) -> bool:
        return self.answers.synced

    def resolver(self, recursion: bool = False) -> Resolver:
        return Resolver(self.answers, recursion=recursion)
