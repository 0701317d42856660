"""mathtune as a user gets it: a wheel of the checkout, installed in a fresh virtual environment, runs the tiny preset
from a directory outside the checkout with the presets and report templates the wheel ships.

Tests need no network, so the wheel is built without build isolation (setuptools comes with the test extra) and the
fresh environment borrows the installed dependencies through a .pth file; the checkout's own (editable) mathtune is
kept out of it, and the installed copy is checked to be the one imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCE = REPO / "src" / "mathtune"
# What the wheel must hold: every module, and the package data pyproject.toml declares.
SHIPPED = ("**/*.py", "presets/*.yaml", "report/templates/*")
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                    ".pytest_cache", ".hypothesis")
MISSING_TOOLS = [name for name in ("setuptools", "pip") if importlib.util.find_spec(name) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING_TOOLS), reason=f"cannot build a wheel without {' and '.join(MISSING_TOOLS)} (pip install -e '.[test]')")


def run_checked(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def outside_env(**extra: str) -> dict:
    """The environment minus anything that would put the checkout's sources on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def dependency_dirs() -> list[str]:
    """The site directories this interpreter gets its dependencies from (not the checkout's src/)."""
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def shipped_files(package_dir: Path) -> set[str]:
    return {str(p.relative_to(package_dir)) for pattern in SHIPPED for p in package_dir.glob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtual environment with the checkout's wheel installed: its python, bin and site-packages."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy, so that building leaves no build/ or egg-info in the checkout (nor reuses one)
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", root / "dist", source], timeout=300, cwd=root, env=outside_env())
    wheels = list((root / "dist").glob("mathtune-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, cwd=root, env=outside_env())
    python = venv / "bin" / "python"
    purelib = Path(run_checked([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               timeout=60, cwd=root, env=outside_env()).stdout.strip())
    # Appended after the venv's own site-packages; .pth files in these directories (the editable install's) are
    # not processed, so the checkout's mathtune stays out.
    (purelib / "_mathtune_test_dependencies.pth").write_text("".join(d + "\n" for d in dependency_dirs()))
    # --ignore-installed: the borrowed directories hold the editable install's metadata, which pip must not touch.
    run_checked([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                 "--disable-pip-version-check", wheels[0]], timeout=300, cwd=root, env=outside_env())
    return {"root": root, "python": python, "bin": venv / "bin", "site": purelib}


def test_the_wheel_ships_every_module_the_presets_and_the_report_templates(installed):
    installed_files = shipped_files(installed["site"] / "mathtune")
    source_files = shipped_files(PACKAGE_SOURCE)
    assert source_files - installed_files == set()
    assert {f for f in installed_files if f.startswith("presets/")} == {f"presets/{p.name}" for p in
                                                                         PACKAGE_SOURCE.glob("presets/*.yaml")}
    assert "presets/tiny.yaml" in installed_files
    assert {f for f in installed_files if f.startswith("report/templates/")} == {
        f"report/templates/{p.name}" for p in PACKAGE_SOURCE.glob("report/templates/*")}


def test_the_fresh_environment_imports_the_installed_mathtune_and_finds_its_presets_there(installed):
    probe = "import mathtune, mathtune.config as c; print(mathtune.__file__); print(c.PRESET_DIR)"
    lines = run_checked([installed["python"], "-c", probe], timeout=120, cwd=installed["root"],
                        env=outside_env()).stdout.splitlines()
    package, preset_dir = Path(lines[-2]), Path(lines[-1])
    assert package.is_relative_to(installed["site"] / "mathtune"), package
    assert preset_dir == installed["site"] / "mathtune" / "presets"
    assert (preset_dir / "tiny.yaml").is_file()


def test_the_installed_command_runs_the_tiny_preset_outside_the_checkout(installed, small_gsm8k, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "runs"
    run_checked([installed["bin"] / "mathtune", "run", "--preset", "tiny", "--output-dir", out], timeout=1200,
                cwd=elsewhere, env=outside_env(MATHTUNE_DATA=str(small_gsm8k)))
    run_dir = out / "tiny"  # the preset's name
    assert (run_dir / "report.html").is_file()
    assert (run_dir / "summary.json").is_file()
