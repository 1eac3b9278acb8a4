"""Every module imports alone, and the package's modules import each other without a cycle
(counting imports inside functions and under TYPE_CHECKING, which hide cycles rather than
remove them)."""

from __future__ import annotations

import ast
import asyncio
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import discovery

PACKAGE = Path(discovery.__file__).parent


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = module_names()


def imported_by(name: str) -> set[str]:
    """The package's modules that module `name` imports, wherever the import stands."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    is_package = path.is_dir()
    source = (path / "__init__.py") if is_package else path.with_suffix(".py")
    here = name if is_package else name.rpartition(".")[0]  # the module's own package
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module; `from module import name` not
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


def test_the_module_list_is_complete() -> None:
    assert {"discovery.cli", "discovery.server", "discovery.workers", "discovery.net.ipam"} <= set(
        MODULES
    )


def test_the_intra_package_imports_form_no_cycle() -> None:
    graph = {name: imported_by(name) for name in MODULES}
    assert graph["discovery.cli"] >= {"discovery.config", "discovery.server"}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert set(order) == set(MODULES)


async def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    limit = asyncio.Semaphore(4)

    async def load(name: str) -> tuple[str, int, str]:
        async with limit:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"import {name}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(60):
                _, stderr = await proc.communicate()
            assert proc.returncode is not None
            return name, proc.returncode, stderr.decode()

    scripts = {"discovery.__main__"}  # importing it runs the command
    results = await asyncio.gather(*(load(name) for name in MODULES if name not in scripts))
    failed = {name: stderr for name, code, stderr in results if code != 0}
    assert not failed, failed
