"""What each install brings is what each command imports: the client alone, or an extra.

``pip install fedsite`` is the client; ``[coordinator]``, ``[simulation]`` and ``[all]`` add the rest
(pyproject.toml). The scan of tests/test_layers.py (every import, those inside functions too) follows each
command's modules transitively; each third-party module they import is mapped to the distributions that
provide it (``importlib.metadata.packages_distributions``) and must come from the requirements that command's
install has, declared directly (a package fedsite imports is named in pyproject.toml, not left to another
package's requirements). The modules a command checks before it starts (localio/extras.py) must be exactly
what it needs beyond the base, so a missing extra is one line, never a traceback from deep inside.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from localio.extras import EXTRA_MODULES
from tests.test_layers import _graph, _imports, _modules

REPO = Path(__file__).resolve().parents[1]
OWN = {"localio", "protos", "privacy", "emulator", "coordinator", "client", "simulations"}
# what each install offers: its commands' entry modules (the base: fedsite-client and fedsite-emulator)
COMMANDS = {
    "": ("client.cli", "client.__main__", "emulator.cli"),
    "coordinator": ("coordinator.cli", "coordinator.__main__"),
    "simulation": ("simulations.cli",),
}
# modules that only run behind their own extra check: fedsite-client split (and the simulator, which
# checks the whole simulation extra) partition with flwr-datasets; nothing else calls localio.partition's
# partitioners (coordinator/config.py and client/cli.py import only its word list, PARTITIONS)
GUARDED = {"localio.partition": ("simulation", ("flwr_datasets", "datasets"))}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return _normal(match.group(0))


@cache
def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(extra: str) -> set[str]:
    """Distribution names an install of fedsite[extra] asks for directly ("" = the base), self-references expanded."""
    project = _project()
    if not extra:
        return {_name(r) for r in project["dependencies"]}
    names: set[str] = set()
    for requirement in project["optional-dependencies"][extra]:
        own = re.fullmatch(r"fedsite\[([^\]]+)\]", requirement.strip())
        if own:
            for part in own.group(1).split(","):
                names |= _requirements(part.strip()) | _requirements("")
        else:
            names.add(_name(requirement))
    return names


def _closure(roots: tuple[str, ...]) -> set[str]:
    graph, seen, todo = _graph(), set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def _third_party(modules: set[str], extra: str) -> dict[str, set[str]]:
    """top-level third-party module -> the fedsite modules that import it (those guarded by another extra left out)."""
    found: dict[str, set[str]] = {}
    for module in modules - {m for m, (guard, _) in GUARDED.items() if guard != extra}:
        for target in _imported(module):
            top = target.split(".")[0]
            if top and top not in OWN and top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, set()).add(module)
    return found


@cache
def _providers() -> Mapping[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


@cache
def _imported(module: str) -> tuple[str, ...]:
    return tuple(target for target, _ in _imports(module, _modules()[module]))


def _distributions(module: str) -> set[str]:
    dists = _providers().get(module)
    assert dists, f"{module} is imported by fedsite but no installed distribution provides it (run .ci/setup)"
    return {_normal(d) for d in dists}


@pytest.mark.parametrize("extra", sorted(COMMANDS))
def test_each_command_imports_only_what_its_install_declares(extra: str) -> None:
    base = _requirements("")
    allowed = base | (_requirements(extra) if extra else set())
    roots = COMMANDS[extra] if extra else tuple(m for m in _modules() if m.split(".")[0] == "client") + COMMANDS[""]
    undeclared = {f"{module} (imported by {', '.join(sorted(users)[:3])})"
                  for module, users in _third_party(_closure(roots), extra).items()
                  if not _distributions(module) & allowed}
    label = f"fedsite[{extra}]" if extra else "fedsite (the client)"
    assert not undeclared, f"{label} imports modules its requirements do not declare: {sorted(undeclared)}"
    if extra:  # the modules beyond the base are exactly those the command checks for before it starts
        beyond = {module for module in _third_party(_closure(roots), extra) if not _distributions(module) & base}
        assert beyond == set(EXTRA_MODULES[extra]), (extra, sorted(beyond), EXTRA_MODULES[extra])


def test_the_client_reaches_partitioning_only_behind_its_check() -> None:
    """localio.partition's flwr-datasets imports are the ones ``fedsite-client split`` checks for."""
    for module, (extra, checked) in GUARDED.items():
        imported = {t.split(".")[0] for t in _imported(module)} - OWN - set(sys.stdlib_module_names)
        imported.discard("__future__")
        assert imported == set(checked) and imported <= set(EXTRA_MODULES[extra]), (module, imported)
        assert all(_distributions(m) & _requirements(extra) for m in imported)
    assert "client.cli" in {m for m in _modules() if "localio.partition" in _graph()[m]}
    source = (REPO / "client" / "cli.py").read_text()
    assert 'missing_extra("simulation", "fedsite-client split", ("flwr_datasets", "datasets"))' in source


def test_the_extras_are_consistent() -> None:
    extras = _project()["optional-dependencies"]
    base = _requirements("")
    assert set(EXTRA_MODULES) <= set(extras) and {"all", "dev"} <= set(extras)
    # no extra repeats a base requirement, and every module an extra's check names comes from that extra
    for extra in (*EXTRA_MODULES, "dev"):
        direct = {_name(r) for r in extras[extra] if not r.startswith("fedsite[")}
        assert not direct & base, (extra, direct & base)
    for extra, modules in EXTRA_MODULES.items():
        for module in modules:
            assert _distributions(module) & (_requirements(extra) - base), (extra, module)
    # all is every extra but dev; dev is all plus the tools, so .ci/setup's `-e ".[dev]"` installs everything
    assert extras["all"] == [f"fedsite[{','.join(sorted(EXTRA_MODULES))}]"]
    assert "fedsite[all]" in extras["dev"]
    assert _requirements("all") == base.union(*(_requirements(e) for e in EXTRA_MODULES))
    assert _requirements("all") < _requirements("dev")
    # the base installs no server or simulator
    assert not base & {"flwr", "flwr-datasets", "ray", "grpcio-health-checking", "grpcio-reflection", "matplotlib"}


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    from client.cli import main as client_main
    from coordinator.cli import main as coordinator_main
    from simulations.cli import main as simulate_main

    # a module set to None in sys.modules is one Python cannot import and find_spec does not find
    for module in ("grpc_health", "flwr_datasets", "ray"):
        monkeypatch.setitem(sys.modules, module, None)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    runs = [
        (coordinator_main, ["--help"], "fedsite-coordinator needs the coordinator extra (grpc_health is not "
                                       "installed): pip install 'fedsite[coordinator]'"),
        (simulate_main, ["--help"], "fedsite-simulate needs the simulation extra (ray is not installed): "
                                    "pip install 'fedsite[simulation]'"),
        (client_main, ["split", "--data", str(data), "--clients", "1", "--output-dir", str(tmp_path / "out")],
         "fedsite-client split needs the simulation extra (flwr_datasets is not installed): "
         "pip install 'fedsite[simulation]'"),
    ]
    for main, argv, line in runs:
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", line + "\n"), main
    assert not (tmp_path / "out").exists()
