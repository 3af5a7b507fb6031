"""The checkout shadows no installed package, the wheel ships the kernels as
``csp_inductor.kernels``, and ``make``'s environments hold exactly their locks' versions.

Whenever the repository root is first on ``sys.path`` (``python -m`` and pytest run from it, a
user's script saved in the checkout), whatever is importable there hides an installed package of
the same name: transformers >= 5.25 imports Hugging Face's ``kernels``, and ``kernels/`` is ours.
So ``kernels/`` has no ``__init__.py`` (a folder without one never hides an installed package),
and ``csp_inductor/kernels`` links to it: the subpackage ``csp_inductor.kernels``.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = ("aot.py", "aot_resources.json", "decomposed_scores.py", "n_softmax.py")


def test_the_root_holds_no_importable_package_but_csp_inductor():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    packages = {path.split("/")[0] for path in tracked if re.fullmatch(r"[^/]+/__init__\.py", path)}
    modules = {path for path in tracked if re.fullmatch(r"[^/]+\.(py|pth)", path)}
    assert packages | modules == {"csp_inductor"}


IMPORTS = f"""
import importlib.metadata, sys
sys.path.insert(0, {str(ROOT)!r})
import csp_inductor.kernels.decomposed_scores, csp_inductor.kernels.n_softmax
import transformers.integrations.hub_kernels
try:
    importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:  # transformers < 5.25 does not need it
    print("absent")
else:
    import kernels
    from kernels import get_kernel  # Hugging Face's
    print(kernels.__file__)
"""


def test_installed_packages_import_with_the_root_first_on_sys_path():
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != "absent":
        assert Path(out.stdout.strip()).resolve().parent != ROOT / "kernels"


def test_the_wheel_ships_the_kernels_as_a_subpackage(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("csp_inductor", "kernels"):  # the link stays a link
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", tmp_path, source], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"csp_inductor/kernels/{name}" for name in KERNEL_FILES} <= set(names)
    assert not [name for name in names if name.startswith("kernels/")]

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site,
                    wheel], check=True, capture_output=True)  # fmt: skip
    code = "import csp_inductor.kernels.decomposed_scores as m; print(m.__file__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    installed = Path(out.stdout.strip())
    assert installed.parent == site / "csp_inductor" / "kernels"
    assert (installed.parent / "aot_resources.json").exists()


def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (as ``pip freeze`` writes them) by normalised name, without local
    version labels (the lock has torch 2.13.0 where the CPU build is 2.13.0+cpu)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    return pins


@pytest.mark.skipif(
    not os.environ.get("CSP_LOCK"), reason="not run by make (CSP_LOCK names the lock it installed)"
)
def test_the_environment_holds_exactly_the_locks_versions():
    # pip's own view of the environment (importlib.metadata would also list the packages that
    # setuptools vendors, once something has imported it), as make lock wrote it
    freeze = [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"]
    installed = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    assert read_pins(installed) == read_pins((ROOT / os.environ["CSP_LOCK"]).read_text())
