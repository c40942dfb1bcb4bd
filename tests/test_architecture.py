"""ARCHITECTURE.md's import rules, checked: a lower layer never imports an upper one, and parts of
one layer import each other only inside their own concept package."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flannelpy"

# Lowest first; a module belongs to the longest prefix listed.  Keep in step with ARCHITECTURE.md.
LAYERS: list[list[str]] = [
    ["flannelpy", "flannelpy.errors", "flannelpy.fileutil"],
    ["flannelpy.config"],
    ["flannelpy.subnet.lease", "flannelpy.subnet.prefixes", "flannelpy.subnet.allocation",
     "flannelpy.subnet.envfile", "flannelpy.docker.opts", "flannelpy.hostnet.iptables_rules",
     "flannelpy.hostnet.nftables_rules", "flannelpy.hostnet.nft_tables"],
    ["flannelpy.etcd", "flannelpy.hostnet", "flannelpy.docker", "flannelpy.ops"],
    ["flannelpy.subnet", "flannelpy.backends"],
    ["flannelpy.agent"],
    ["flannelpy.lab"],
    ["flannelpy.cli"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def place(module: str) -> tuple[int, str]:
    """(layer index, the prefix that placed it)."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def imports_of(path: Path) -> set[str]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rsplit(".", 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("flannelpy"):
                continue
            # `from flannelpy.ops import sdnotify` imports the module flannelpy.ops.sdnotify
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            found.update(subs or [base])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flannelpy"))
    return found


def concept(module: str) -> str:
    return ".".join(module.split(".")[:2])


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    me = module_name(path)
    my_layer, _ = place(me)
    for target in sorted(imports_of(path)):
        if target == "flannelpy" or target.startswith(me + "."):
            continue
        layer, _ = place(target)
        assert layer <= my_layer, f"{me} (layer {my_layer}) imports {target} (layer {layer}), an upper layer"
        if layer == my_layer and my_layer > 0:
            assert concept(target) == concept(me), (
                f"{me} imports {target}: parts of one layer import each other only inside their own package"
            )


def test_every_backend_is_one_folder() -> None:
    from flannelpy.backends import available_backends

    backends = available_backends()
    assert {"vxlan", "udp", "host-gw", "alloc"} <= set(backends)
    for cls in backends.values():
        parts = cls.__module__.split(".")
        assert parts[:2] == ["flannelpy", "backends"] and len(parts) == 4, cls.__module__
        assert (PACKAGE / "backends" / parts[2] / "__init__.py").exists()


def test_architecture_doc_names_every_layer() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for prefixes in LAYERS:
        for prefix in prefixes:
            if prefix != "flannelpy":
                assert f"`{prefix.removeprefix('flannelpy.').replace('.', '/')}" in text, prefix
