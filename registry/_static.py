"""A registry fixed at start-up: ``{service: [address, ...]}`` from a flag or a JSON file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from accord.registry._base import Instance


class StaticRegistry:
    def __init__(self, services: Mapping[str, Iterable[str]] | None = None) -> None:
        self._services: dict[str, tuple[Instance, ...]] = {}
        for name, addresses in (services or {}).items():
            self._services[name] = tuple(
                Instance(service=name, instance_id=f"{name}-{i}", address=a)
                for i, a in enumerate(addresses)
            )

    @classmethod
    def parse(cls, specs: Iterable[str]) -> StaticRegistry:
        """From ``name=host:port[,host:port...]`` items, or ``@file.json`` holding
        ``{"name": ["host:port", ...]}``."""
        services: dict[str, list[str]] = {}
        for spec in specs:
            if spec.startswith("@"):
                data = json.loads(Path(spec[1:]).read_text())
                if not isinstance(data, dict):
                    raise ValueError(f"{spec[1:]}: expected an object of service -> addresses")
                for name, addrs in data.items():
                    if isinstance(addrs, str):
                        addrs = [addrs]
                    services.setdefault(str(name), []).extend(str(a) for a in addrs)
                continue
            name, sep, addrs = spec.partition("=")
            if not sep or not name or not addrs:
                raise ValueError(f"service map: expected name=host:port[,host:port], got {spec!r}")
            services.setdefault(name, []).extend(a for a in addrs.split(",") if a)
        return cls(services)

    def instances(self, service: str) -> Sequence[Instance]:
        return self._services.get(service, ())

    def known(self, service: str) -> bool:
        return service in self._services

    def describe(self) -> str:
        return "the static service map (--service NAME=ADDR)"

    def services(self) -> dict[str, tuple[Instance, ...]]:
        return dict(self._services)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
