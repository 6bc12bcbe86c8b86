"""The layer rules, checked on every import in the product packages (those inside functions too).

    simulations/                      the simulator runs both sides
    coordinator/ (server)   client/ (edge)
    emulator/ (model code)  privacy/
    protos/ (wire: service, codec, typed messages)
    localio/ (the bottom layer: data files, partitioning, atomic writes, user errors)

- the edge never imports the server or the simulator, and the server never imports the edge;
- model and privacy code import neither side, nor the simulator, nor a transport (grpc, flwr);
- the wire schema knows no training, and the bottom layer imports no other fedsite package;
- no import cycles between modules, and no product file over ~500 lines;
- no product module imports the benchmarks (simulations/bench/) or the tests' harnesses (simulations/harness/).

A static scan (``ast``), so a function-level import cannot hide a dependency or a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("localio", "protos", "privacy", "emulator", "coordinator", "client", "simulations")
TRANSPORTS = ("grpc", "grpc_health", "grpc_reflection", "flwr")
# package -> what it must never import (fedsite packages or third-party transports)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "localio": ("protos", "privacy", "emulator", "coordinator", "client", "simulations"),
    "protos": ("privacy", "emulator", "coordinator", "client", "simulations"),
    "privacy": ("coordinator", "client", "simulations", *TRANSPORTS),
    "emulator": ("coordinator", "client", "simulations", *TRANSPORTS),
    "coordinator": ("client", "simulations"),
    "client": ("coordinator", "simulations"),
}
# third-party packages only the server or the simulator needs: a party that runs the client does not
SERVER_ONLY = ("grpc_health", "grpc_reflection", "flwr", "ray", "matplotlib")
MAX_LINES = 500
# files over MAX_LINES today, to be split by job; the list may only shrink
OVERSIZE = {"simulations/harness/fuzz_rpc.py"}
# benchmarks are scripts, not product code
SIZE_EXEMPT = "simulations/bench/*.py"
# the benchmarks and the tests' harnesses: tools around the product, which no product module imports
TOOLS = ("simulations.bench", "simulations.harness")


def _product_files() -> Iterator[Path]:
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in _product_files()}


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from protos import fedsite_pb2` imports a module, not a name
                if f"{target}.{alias.name}" in _modules():
                    yield f"{target}.{alias.name}", node.lineno


@cache
def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported product module: first line}; names are resolved to the module that defines them."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(module, path):
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def test_every_import_respects_the_layers() -> None:
    broken = []
    for module, path in _modules().items():
        forbidden = FORBIDDEN.get(module.split(".")[0], ())
        for target, line in _imports(module, path):
            if target.split(".")[0] in forbidden:
                broken.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not broken, "layer rules broken:\n" + "\n".join(broken)


def test_the_client_reaches_no_server_or_simulator_code() -> None:
    """Everything a client process can import (transitively, function-level imports included)."""
    modules, graph = _modules(), _graph()
    seen, todo = set(), [m for m in modules if m.split(".")[0] == "client"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not {m for m in seen if m.split(".")[0] in ("coordinator", "simulations")}
    third_party = {target.split(".")[0] for module in seen for target, _ in _imports(module, modules[module])}
    assert not third_party & set(SERVER_ONLY), sorted(third_party & set(SERVER_ONLY))


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    # a package's __init__ re-exporting its modules, which import siblings through the package, is not a cycle
    cycles = [c for c in cycles if not _only_package_reexports(c, graph)]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _only_package_reexports(component: list[str], graph: dict[str, dict[str, int]]) -> bool:
    """True when the cycle closes only through a package __init__ importing its own submodules."""
    members = set(component)
    for module in component:
        for target in graph[module]:
            if target in members and not target.startswith(module + ".") and not module.startswith(target + "."):
                return False
    return True


def test_no_product_file_grows_past_the_limit() -> None:
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in _product_files()
             if not path.relative_to(REPO).match(SIZE_EXEMPT)}
    over = {name for name, lines in sizes.items() if lines > MAX_LINES}
    assert over <= OVERSIZE, f"over {MAX_LINES} lines (split by job): {sorted(over - OVERSIZE)}"


def _is_tool(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOLS)


def test_no_product_module_imports_a_benchmark_or_a_harness() -> None:
    wrong = [f"{module}:{line} imports {target}" for module, path in _modules().items() if not _is_tool(module)
             for target, line in _imports(module, path) if _is_tool(target)]
    assert _is_tool("simulations.harness.local_cluster") and not _is_tool("simulations.runner")
    assert not wrong, wrong


def test_the_scan_sees_function_level_imports() -> None:
    """The scan itself: an import inside a function is found, and a relative import is resolved."""
    source = "def f():\n    from coordinator.engine import RoundEngine\n"
    tree = ast.parse(source)
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["coordinator.engine"]
    assert "client.runtime" in _graph() and "localio.data" in _graph()["client.runtime"]
