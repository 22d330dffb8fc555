"""Every third-party module that the package, its tests and its benchmarks import is declared in
setup.cfg, so that a clean virtual environment (`pip install -e '.[test]'`, as CI does) can at least
collect the suite. A module that only happens to be installed on a developer's machine (pulled in
by another package, or installed by hand) is exactly what this catches."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ldct_node", "train", "tests", "bench")
# The project's own top-level packages: `train/` installs as ldct_train.
OWN_PACKAGES = {"ldct_node", "ldct_train", "train", "tests", "bench"}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(roots: list[Path], base: Path = REPO) -> dict[str, set[str]]:
    """Top-level module name -> the files (relative to base) that import it, for every absolute
    import anywhere in a file (function-level and guarded imports included)."""
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(base)))
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: files for m, files in modules.items() if m not in sys.stdlib_module_names and m not in OWN_PACKAGES}


def declared_distributions(setup_cfg: Path) -> set[str]:
    """The normalised names in install_requires and in every extra of extras_require."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg, encoding="utf-8")
    values = [parser.get("options", "install_requires", fallback="")]
    if parser.has_section("options.extras_require"):
        values += [value for _, value in parser.items("options.extras_require")]
    names = set()
    for value in values:
        for line in value.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
            if match:
                names.add(normalise(match.group()))
    return names


def undeclared(modules: dict[str, set[str]], declared: set[str]) -> dict[str, list[str]]:
    """Module -> the distributions that provide it, for each module none of whose distributions is
    declared. A module not installed at all is taken to come from the distribution of its own name."""
    provided_by = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(modules):
        distributions = provided_by.get(module) or [module]
        if not {normalise(d) for d in distributions} & declared:
            missing[module] = distributions
    return missing


def describe(missing: dict[str, list[str]], modules: dict[str, set[str]]) -> str:
    return "; ".join(
        f"{module} (distribution {' or '.join(dists)}, imported by {', '.join(sorted(modules[module]))})"
        for module, dists in missing.items()
    )


def test_every_imported_module_is_declared_in_setup_cfg():
    modules = third_party(imported_modules([REPO / d for d in SOURCE_DIRS]))
    missing = undeclared(modules, declared_distributions(REPO / "setup.cfg"))
    assert not missing, (
        "imported but not declared in setup.cfg install_requires or extras_require: " + describe(missing, modules)
    )


def test_the_check_sees_imports_anywhere_and_names_what_is_undeclared(tmp_path):
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "mod.py").write_text(
        "import os.path\nimport numpy as np\nfrom . import sibling\nfrom ldct_node import cli\n"
        "def later():\n    import skimage.metrics\n    from scipy import ndimage\n"
    )
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text(
        "[options]\ninstall_requires =\n    NumPy>=1.26,<3\n# a comment line\n    scipy>=1  # trailing comment\n"
        "[options.extras_require]\ntest =\n    pytest\n"
    )
    modules = third_party(imported_modules([source], base=tmp_path))
    assert set(modules) == {"numpy", "skimage", "scipy"}
    assert declared_distributions(setup_cfg) == {"numpy", "scipy", "pytest"}
    assert set(undeclared(modules, declared_distributions(setup_cfg))) == {"skimage"}
