"""Backend registry: every module here that defines BACKEND is a backend, keyed by name."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from flannelpy.errors import ConfigError

from .base import Backend


def available_backends() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "BACKEND", None)
        if cls is not None:
            found[cls.name] = cls
    return found


def backend_class(backend_type: str) -> type[Backend]:
    # The folder named like the type (host-gw: hostgw) is tried first, alone: a start imports its
    # own backend only, not every backend's modules (the udp forwarder, tc-BPF loader...).
    folder = backend_type.replace("-", "")
    if folder.isidentifier() and folder != "base" and importlib.util.find_spec(f"{__name__}.{folder}") is not None:
        cls = getattr(importlib.import_module(f"{__name__}.{folder}"), "BACKEND", None)
        if cls is not None and cls.name == backend_type:
            return cls
    backends = available_backends()
    try:
        return backends[backend_type]
    except KeyError:
        known = ", ".join(sorted(backends))
        raise ConfigError(f"Backend.Type: unknown backend type: {backend_type!r} (known: {known})") from None
