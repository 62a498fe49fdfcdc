"""pyproject.toml and environment.yml must list the same requirements."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    lines = [line.strip() for line in (ROOT / "environment.yml").read_text().splitlines()]
    listed = {line[2:].strip() for line in lines if line.startswith("- ") and not line.startswith("- -e")}
    pip_listed = listed - {"python=3.11", "pip", "conda-forge", "pip:"}
    assert pip_listed == wanted
    assert "- -e ." in lines  # installs the package itself
