"""An install of pyquant exposes `pyquant` and nothing else (DESIGN.md, "Layout").

Each test copies the working tree (git's tracked and untracked, not ignored files: a fresh clone with the
uncommitted changes), installs it into a new virtual environment and inspects that environment from a
subprocess of its Python:
- `pip install -e <tree>`: sys.path holds neither the tree nor its parent; `kernels`, `bench`, `tests`, `docs`,
  `csrc` are not importable from the tree (so Hugging Face's `kernels`, which bitsandbytes imports, is not
  shadowed); `pyquant.kernels` is the tree's kernels/ folder; `pyquant.__path__` holds no folder but pyquant's
  own (so no `pyquant.pyquant`); a file edited or added under pyquant/ or kernels/ after the install is what
  Python imports;
- `pip wheel <tree>`: the wheel holds pyquant/ (with pyquant/kernels/*.py and pyquant/_lib/libpyquant_cpu.so)
  and its .dist-info, nothing else, and installs to the same picture.

The new environments reach the packages already installed here (torch, bitsandbytes, scikit-build-core, pip)
through a .pth file naming a folder of links to this environment's site-packages, without pyquant and its
editable hook; nothing is downloaded. Nothing is compiled either: CMake's PYQUANT_CPU_LIBRARY installs the
libpyquant_cpu.so that this environment's install built, so a test takes seconds, not the minutes of the
C++ build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIBLINGS = ("kernels", "bench", "tests", "docs", "csrc")  # top-level folders of the tree that must not import
LIB = "libpyquant_cpu.so"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scikit_build_core") is None or importlib.util.find_spec("pip") is None,
    reason="needs pip and scikit-build-core in this environment (pip install -e '.[test]')",
)

# Run by the new environment's Python: prints what it sees as JSON. argv[1]: the site-packages to write a stand-in
# for Hugging Face's `kernels` into ("" for none).
CHECK = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, sys
    fake_site = sys.argv[1]
    out = {"sys_path": sys.path}
    out["siblings"] = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in %r}
    if fake_site:
        # Hugging Face's `kernels` is not installed here: a stand-in with the function bitsandbytes imports.
        os.makedirs(os.path.join(fake_site, "kernels"))
        with open(os.path.join(fake_site, "kernels", "__init__.py"), "w") as f:
            f.write("import types\\ndef get_kernel(name, version=None):\\n"
                    "    return types.SimpleNamespace(gemm_4bit_forward=None)\\n")
        importlib.invalidate_caches()
        import kernels
        out["kernels"] = kernels.__file__
        if importlib.util.find_spec("bitsandbytes") is not None:
            import contextlib, io
            with contextlib.redirect_stderr(io.StringIO()) as said:
                import bitsandbytes
            out["bitsandbytes"] = said.getvalue()
    import pyquant, pyquant.kernels, pyquant.backends.capi
    out["pyquant"] = pyquant.__file__
    out["pyquant_path"] = list(pyquant.__path__)
    out["kernels_file"] = pyquant.kernels.__file__
    out["nested"] = {n: importlib.util.find_spec("pyquant." + n) is not None for n in ("pyquant",) + %r[1:]}
    out["lib"] = [str(d) for d in pyquant.backends.capi._candidate_dirs() if (d / %r).is_file()]
    out["probes"] = {}
    for name in ("pyquant", "pyquant.kernels", "pyquant._install_probe", "pyquant.kernels._install_probe"):
        try:
            out["probes"][name] = getattr(importlib.import_module(name), "INSTALL_PROBE", None)
        except ImportError:
            out["probes"][name] = None
    print("CHECK " + json.dumps(out))
    """
    % (SIBLINGS, SIBLINGS, LIB)
)


def _env() -> dict[str, str]:
    """This process's environment without what would steer Python, pip, scikit-build-core or pyquant elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "SKBUILD", "VIRTUAL_ENV", "PYQUANT_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _built_library() -> Path | None:
    """The libpyquant_cpu.so that this environment's install built (or the checkout's build folder holds)."""
    spec = importlib.util.find_spec("pyquant")
    dirs = [Path(p) / "_lib" for p in (spec.submodule_search_locations or [])] if spec else []
    dirs += sorted((ROOT / "build").glob("*"))
    return next((d / LIB for d in dirs if (d / LIB).is_file()), None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(a copy of the working tree, a folder of links to this environment's packages, the built library)."""
    lib = _built_library()
    if lib is None:
        pytest.skip(f"no built {LIB} to install (pip install -e . builds it)")
    base = tmp_path_factory.mktemp("install")
    tree = base / "checkout"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"the checkout is not a git work tree: {listed.stderr.strip()}")
    for rel in filter(None, listed.stdout.split("\0")):
        src = ROOT / rel
        if src.is_symlink() or src.is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel, follow_symlinks=False)
    deps = base / "deps"
    deps.mkdir()
    for site in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        for entry in Path(site).iterdir():
            name = entry.name
            skip = name.startswith(("pyquant", "_editable_skbc_", "__editable__")) or name.endswith(".pth")
            if not skip and name != "__pycache__" and not (deps / name).exists():
                (deps / name).symlink_to(entry)
    return tree, deps, lib


def _venv(path: Path, deps: Path) -> tuple[Path, Path]:
    """A new virtual environment that sees `deps`: (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, env=_env())
    python = path / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    (site / "_pyquant_test_deps.pth").write_text(f"{deps}\n")
    return python, site


def _config(lib: Path, build_dir: Path) -> list[str]:
    return [f"--config-settings=build-dir={build_dir}", f"--config-settings=cmake.define.PYQUANT_CPU_LIBRARY={lib}"]


def _check(python: Path, cwd: Path, fake_site: Path | str = "") -> tuple[dict, str]:
    done = subprocess.run(
        [python, "-I", "-c", CHECK, str(fake_site)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"the check failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    line = next(x for x in done.stdout.splitlines() if x.startswith("CHECK "))
    return json.loads(line[len("CHECK "):]), done.stderr


def _assert_only_pyquant(seen: dict, tree: Path) -> None:
    outside = {tree.resolve(), tree.parent.resolve()}
    for entry in seen["sys_path"]:
        p = Path(entry or ".").resolve()
        assert p not in outside and tree.resolve() not in p.parents, f"sys.path holds {entry}: {seen['sys_path']}"
    for name, origin in seen["siblings"].items():
        assert origin is None or tree.resolve() not in Path(origin).resolve().parents, (
            f"`import {name}` finds the tree's folder: {origin}"
        )
    assert not any(seen["nested"].values()), f"folders beside pyquant import under it: {seen['nested']}"
    assert seen["lib"], f"no {LIB} in the pyquant.__path__ entries' _lib: {seen['pyquant_path']}"


def test_editable_install_exposes_only_pyquant(work, tmp_path):
    tree, deps, lib = work
    python, site = _venv(tmp_path / "venv", deps)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *_config(lib, tmp_path / "build"),
          "-e", tree], cwd=tmp_path)

    pth = [line for f in site.glob("*.pth") if f.name != "_pyquant_test_deps.pth" for line in f.read_text().splitlines()]
    assert all(line.startswith("import ") for line in pth), f"the editable hook adds folders to sys.path: {pth}"

    # Edit and add files after the install: Python must see them without a reinstall.
    for rel in ("pyquant/__init__.py", "kernels/__init__.py"):
        with open(tree / rel, "a") as f:
            f.write(f"\nINSTALL_PROBE = {rel!r}\n")
    for rel in ("pyquant/_install_probe.py", "kernels/_install_probe.py"):
        (tree / rel).write_text(f"INSTALL_PROBE = {rel!r}\n")

    seen, _ = _check(python, tmp_path, fake_site=site)
    _assert_only_pyquant(seen, tree)
    assert {Path(p).resolve() for p in seen["pyquant_path"]} <= {(site / "pyquant").resolve(), (tree / "pyquant").resolve()}
    assert Path(seen["pyquant"]).resolve() == (tree / "pyquant" / "__init__.py").resolve()
    assert Path(seen["kernels_file"]).resolve() == (tree / "kernels" / "__init__.py").resolve()
    assert seen["probes"] == {
        "pyquant": "pyquant/__init__.py",
        "pyquant.kernels": "kernels/__init__.py",
        "pyquant._install_probe": "pyquant/_install_probe.py",
        "pyquant.kernels._install_probe": "kernels/_install_probe.py",
    }
    # `import kernels` is someone else's package (here a stand-in for Hugging Face's), and bitsandbytes, which
    # imports it, says nothing about it (before the fix: "cannot import name 'get_kernel' from 'kernels'
    # (<checkout>/kernels/__init__.py)").
    assert Path(seen["kernels"]).resolve() == (site / "kernels" / "__init__.py").resolve()
    said = seen.get("bitsandbytes")
    if said is not None:
        assert "kernels-community" not in said and str(tree) not in said, f"import bitsandbytes said: {said}"


def test_wheel_holds_only_pyquant(work, tmp_path):
    tree, deps, lib = work
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", *_config(lib, tmp_path / "build"),
          "-w", tmp_path / "dist", tree], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("pyquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    strays = [n for n in names if n.split("/")[0] != "pyquant" and not n.split("/")[0].endswith(".dist-info")]
    assert not strays, f"the wheel holds more than pyquant: {strays}"
    kernels = {f"pyquant/kernels/{p.name}" for p in (tree / "kernels").glob("*.py")}
    assert kernels and kernels <= set(names), sorted(kernels - set(names))
    assert f"pyquant/_lib/{LIB}" in names
    nested = [n for n in names if n.split("/")[1] in ("pyquant", *SIBLINGS[1:])]
    assert not nested, f"folders beside pyquant are in the wheel under pyquant/: {nested}"

    python, site = _venv(tmp_path / "venv", deps)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], cwd=tmp_path)
    seen, _ = _check(python, tmp_path)
    _assert_only_pyquant(seen, tree)
    assert [Path(p).resolve() for p in seen["pyquant_path"]] == [(site / "pyquant").resolve()]
    assert Path(seen["kernels_file"]).resolve() == (site / "pyquant" / "kernels" / "__init__.py").resolve()
