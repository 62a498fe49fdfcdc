"""The library stays apart from its apps, and its functions stay short (issue 16).

Apps are the thin layers over the library: the demo page, the benchmark (bench*.py, stepbench, loadbench), the experiments
(quickstart, ablation) and the command line. The library (every other module of tgdp_core)
never imports them, at module level or inside a function.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tgdp_core"
APPS = {"demo", "bench", "bench_gpu", "bench_official", "stepbench", "loadbench", "experiments", "__main__"}
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _imported_package_modules(tree: ast.AST) -> set[str]:
    """tgdp_core modules a module imports, by their short name (relative or absolute imports)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").startswith("tgdp_core")
            if node.level >= 1 or absolute:
                module = (node.module or "").removeprefix("tgdp_core").lstrip(".")
                if module:
                    found.add(module.split(".")[0])
                else:  # from . import demo, evaluate
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tgdp_core."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("path", [p for p in _modules() if p.stem not in APPS], ids=lambda p: p.stem)
def test_library_modules_do_not_import_apps(path):
    imported = _imported_package_modules(ast.parse(path.read_text()))
    assert not imported & APPS, f"{path.name} imports the app module(s) {sorted(imported & APPS)}"


def test_the_import_check_sees_relative_absolute_and_local_imports():
    source = ("from . import demo\nfrom .bench import x\nimport tgdp_core.experiments\n"
              "def f():\n    from tgdp_core.retrieval import Retriever\n")
    assert _imported_package_modules(ast.parse(source)) == {"demo", "bench", "experiments", "retrieval"}


def test_no_function_in_the_package_is_over_60_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_demo_module_stays_a_thin_page():
    assert len((PACKAGE / "demo.py").read_text().splitlines()) < 400
    assert "gradio" not in (PACKAGE / "retrieval.py").read_text()
