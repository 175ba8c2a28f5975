"""The engine replicas that this process's routers currently see, by deployment ("app/name").

Serve rebuilds a router's class from a pickled copy, so the router's own module globals are
not this process's; it writes here through this module, which pickles by reference."""

from __future__ import annotations

REPLICAS: dict[str, tuple[str, ...]] = {}


def key(app_name: str, deployment_name: str) -> str:
    return f"{app_name}/{deployment_name}"
