"""The layers a newcomer can see, kept true: the foundation (spotmesh/) imports no service and no
shell, a service imports no other service and no shell, no module imports one that imports it
back, and importing a service's server pulls in neither the shell nor matplotlib.

Every import counts, also those inside functions: a lazy import still points up the stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("spotmesh", "services", "cli")
SERVICES = sorted(p.name for p in (REPO / "services").iterdir()
                  if (p / "__init__.py").exists())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            if "v1" not in path.relative_to(REPO).parts:  # generated code
                out[module_name(path)] = path
    return out


MODULES = project_modules()


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports (resolved to modules that exist)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str:
    return name.split(".")[0]


def service(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def test_the_foundation_imports_no_service_and_no_shell():
    bad = {m: sorted(i for i in deps if layer(i) != "spotmesh")
           for m, deps in GRAPH.items() if layer(m) == "spotmesh"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_services_import_neither_the_shell_nor_each_other():
    bad = {}
    for m, deps in GRAPH.items():
        if layer(m) != "services":
            continue
        wrong = sorted(i for i in deps if layer(i) == "cli" or (
            layer(i) == "services" and service(i) not in (None, service(m))))
        if wrong:
            bad[m] = wrong
    assert bad == {}


def test_no_import_cycle():
    """Depth-first search for a back edge over every project module."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d):], d] if d in path else [m, d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("svc", SERVICES)
def test_a_service_server_loads_without_the_shell_or_matplotlib(svc):
    code = (f"import sys, services.{svc}.server, services.{svc}.config; "
            "print(sorted(m for m in sys.modules if m == 'cli' or m.startswith('cli.') "
            "or m.startswith('matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_graph_sees_the_imports_it_should():
    """Guards the checker itself: a module known to import another is seen to."""
    assert "spotmesh.prefix_hash" in GRAPH["services.gateway.prefix"]
    assert "cli.supervisor" in GRAPH["cli.up"]
    assert "services.autoscaler.actuator" in GRAPH["services.autoscaler.local"]
