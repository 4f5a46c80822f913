"""The layout holds: rbee's core imports nothing but the standard library, pydantic and itself;
its border to the hub, the cache and vLLM does not import Ray; the client side imports
neither Ray nor the server (``rbee serve`` loads the server when it runs)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ACTORS = Path(__file__).resolve().parent.parent / "actors"
CORE = ACTORS / "core"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom):  # relative: inside the package
            names.append("actors.core")
    return names


#: What the core may import beyond the standard library and itself: the operations and
#: the config are pydantic models, and the config is read from YAML.
CORE_MAY_USE = frozenset({"pydantic", "pydantic_core", "yaml"})


def test_the_core_imports_only_the_standard_library_pydantic_and_itself():
    """No Ray, httpx, Starlette, vLLM or huggingface_hub in the core (STYLE item 1)."""
    modules = sorted(CORE.glob("*.py"))
    assert {"operations.py", "config.py", "jobs.py", "table.py"} <= {p.name for p in modules}
    foreign = {
        f"{path.name}: {name}"
        for path in modules
        for name in _imports(path)
        if name.split(".")[0] not in sys.stdlib_module_names | CORE_MAY_USE
        and name != "actors.core"
        and not name.startswith("actors.core.")
    }
    assert not foreign, sorted(foreign)


def test_the_check_would_see_a_foreign_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("import ray\nfrom actors.registry import JobRegistry\nfrom . import table\n")
    assert _imports(module) == ["ray", "actors.registry", "actors.core"]


def test_the_border_to_hub_cache_and_vllm_does_not_import_ray():
    modules = sorted((ACTORS / "adapters").glob("*.py"))
    assert len(modules) > 5, modules
    with_ray = {
        f"{path.name}: {name}"
        for path in modules
        for name in _imports(path)
        if name.split(".")[0] == "ray" or name.startswith(("actors.registry", "actors.hive"))
    }
    assert not with_ray, sorted(with_ray)


def _top_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_client_side_imports_neither_ray_nor_the_server():
    client = ACTORS.parent / "serve_app" / "client"
    modules = sorted(client.glob("*.py"))
    assert len(modules) >= 4, modules
    found = {
        f"{path.name}: {name}"
        for path in modules
        for name in _top_level_imports(path)
        if name.split(".")[0] == "ray" or name.startswith("serve_app.server")
    }
    assert not found, sorted(found)


def test_every_benchmark_script_imports():
    """A bench script whose helper moved is found here, not on the day it is run."""
    import importlib

    bench = ACTORS.parent / "bench"
    scripts = sorted(p.stem for p in bench.glob("*.py") if not p.stem.startswith("_"))
    assert len(scripts) > 5, scripts
    sys.path.insert(0, str(bench))
    try:
        for name in scripts:
            module = importlib.import_module(name)
            assert callable(getattr(module, "bench", None) or getattr(module, "body", None)), name
    finally:
        sys.path.remove(str(bench))
