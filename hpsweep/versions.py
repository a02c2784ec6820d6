"""Versions that identify what a trial trained on: spec, data, code, environment, and the trial key.

The trial key is the identity of one unit of GPU work: the same key means the same hparams on the
same data with the same spec, trainer code and Python environment, so its result can be reused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.machinery
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpsweep.datacache import file_md5
from hpsweep.dvcdata import content_md5
from hpsweep.inputs import Hparams, ModelSpec, canonical_json, code_paths

def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def spec_hash(spec: ModelSpec) -> str:
    """Hash of the spec's content (not its formatting or comments)."""
    return _sha256(canonical_json(spec.model_dump(mode="json")))[:16]


def data_version(path: Path) -> str:
    """DVC's md5 of a file, or DVC's `.dir` md5 of a folder (hpsweep.dvcdata.content_md5, memoized):
    the hash a `.dvc` file or `dvc.lock` records for the same bytes.

    Read from the bytes, not from a `.dvc` file, so data changed without `dvc add` is a new version.
    """
    return content_md5(path)


# ---------------------------------------------------------------- code: every file of the trainer

TAG_CODE_MANIFEST = "hpsweep.code_manifest"  # trial runs: {file: md5[:8]}, to name the files that changed
MAX_MANIFEST_CHARS = 5000  # MLflow's limit on a tag's value; a bigger manifest is not recorded

SCRIPT_SUFFIXES = {".py", ".sh", ".bash", ".r", ".jl", ".pl", ".rb", ".js", ".lua"}
# State that hpsweep, MLflow and DVC write into the working directory with every sweep: never code.
WORKDIR_STATE = ("mlruns", "mlartifacts", "mlflow.db*", "reports", "dvc.lock")
_PYTHON = re.compile(r"python[0-9.]*")
_MD5: dict[tuple, str] = {}  # (path, size, mtime, inode, ctime) → md5, for this process


def code_version(spec: ModelSpec) -> str:
    """Hash of every file of the trainer (``code_files``): their paths and contents."""
    return _sha256(*(f"{key}\0{md5}" for key, md5 in sorted(code_manifest(spec).items())))[:16]


def code_manifest(spec: ModelSpec) -> dict[str, str]:
    """Each file of the trainer → its md5."""
    return {key: _md5(path) for key, path in code_files(spec).items()}


def code_manifest_tag(spec: ModelSpec) -> dict[str, str]:
    """``{TAG_CODE_MANIFEST: JSON of file → md5[:8]}`` for a trial run, or ``{}`` when it would not fit
    in a tag (then a later plan can say only "code changed", not which file)."""
    text = json.dumps({k: v[:8] for k, v in code_manifest(spec).items()}, sort_keys=True, separators=(",", ":"))
    return {TAG_CODE_MANIFEST: text} if len(text) <= MAX_MANIFEST_CHARS else {}


def code_files(spec: ModelSpec, cwd: Path | None = None) -> dict[str, Path]:
    """The trainer's files, by a name that does not depend on where the project is checked out.

    The spec's ``code:`` paths/globs when given; else the entry point's top-level package (or a
    top-level module and the folder it sits in), or every file a command names, with the folder of
    each script it names (and a ``-m`` module's package). Folders count with their whole tree, less
    what ``.gitignore`` files exclude, hidden entries, ``__pycache__``/``*.pyc``, virtualenvs and
    hpsweep's/MLflow's/DVC's own state in the working directory (``WORKDIR_STATE``).
    """
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    files: dict[str, Path] = {}
    for root in _code_roots(spec, cwd):
        for path in [root] if root.is_file() else _tree(root, cwd):
            key = _file_key(path, root, cwd)
            if files.get(key, path) != path:  # two roots outside the working dir with the same layout
                key = str(path)
            files[key] = path
    return dict(sorted(files.items()))


def _code_roots(spec: ModelSpec, cwd: Path) -> list[Path]:
    if spec.code:
        return code_paths(spec.code, cwd)[0]
    trainer = spec.trainer
    if trainer.entrypoint is not None:
        return _module_roots(trainer.entrypoint.partition(":")[0], cwd)
    argv = list(trainer.command or [])
    roots: list[Path] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "-m":
            roots += _module_roots(arg, cwd)
            continue
        if i == 0 and _PYTHON.fullmatch(Path(arg).name):
            continue  # the interpreter is the environment's (env_version), not the trainer's code
        for candidate in (arg, arg.partition("=")[2] if arg.startswith("-") else ""):
            path = cwd / candidate if candidate else None
            if path is None or not path.is_file():
                continue
            path = Path(os.path.abspath(path))
            roots.append(path)
            if _is_script(path) and not _shared_folder(path.parent, cwd):
                roots.append(path.parent)
    return roots


def _module_roots(module: str, cwd: Path) -> list[Path]:
    """The folder(s) of a module's top-level package; for a top-level module, its file and folder."""
    top = module.partition(".")[0]
    loaded = sys.modules.get(top)
    found = getattr(loaded, "__spec__", None) or importlib.machinery.PathFinder.find_spec(top, [str(cwd), *sys.path])
    if found is None:
        return []
    if found.submodule_search_locations:
        return [Path(os.path.abspath(p)) for p in found.submodule_search_locations]
    if not found.origin or not Path(found.origin).is_file():
        return []  # built in
    path = Path(os.path.abspath(found.origin))
    return [path] if _shared_folder(path.parent, cwd) else [path, path.parent]


def _shared_folder(folder: Path, cwd: Path) -> bool:
    """A folder of many programs (on PATH, site-packages, the standard library): not one trainer's."""
    if folder == cwd:
        return False
    shared = {os.path.abspath(p) for p in [*os.environ.get("PATH", "").split(os.pathsep), *sys.path] if p}
    return str(folder) in shared or folder.name in ("site-packages", "dist-packages")


def _is_script(path: Path) -> bool:
    if path.suffix.lower() in SCRIPT_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _tree(root: Path, cwd: Path) -> list[Path]:
    """Every file under ``root``, less what is never code (see ``code_files``)."""
    ignores = {root: _outer_ignores(root, cwd)}
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        specs = ignores[here] + _gitignore(here)

        def excluded(name: str, is_dir: bool) -> bool:
            if name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".pyo")):
                return True
            if here == cwd and any(fnmatch.fnmatch(name, p) for p in WORKDIR_STATE):
                return True
            if is_dir and (here / name / "pyvenv.cfg").exists():
                return True
            return any(spec.match_file((here / name).relative_to(base).as_posix() + ("/" if is_dir else ""))
                       for base, spec in specs)

        dirnames[:] = sorted(d for d in dirnames if not excluded(d, True))
        for d in dirnames:
            ignores[here / d] = specs
        out += [here / f for f in sorted(filenames) if not excluded(f, False) and (here / f).is_file()]
    return out


def _outer_ignores(root: Path, cwd: Path) -> list[tuple[Path, Any]]:
    """The .gitignore files above ``root`` that git would apply: up to the repository's top (the
    folder with ``.git``), or up to the working directory outside a repository. One that ignores
    ``root`` itself is left out: the trainer's own folder was named, so its files are code."""
    above = list(root.parents)
    top = next((p for p in above if (p / ".git").exists()), None)
    if top is None:
        top = cwd if cwd in above else None
    if top is None:
        return []
    chain = above[: above.index(top) + 1]
    return [(base, spec) for folder in reversed(chain) for base, spec in _gitignore(folder)
            if not spec.match_file(root.relative_to(base).as_posix() + "/")]


def _gitignore(folder: Path) -> list[tuple[Path, Any]]:
    path = folder / ".gitignore"
    if not path.is_file():
        return []
    import pathspec

    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [(folder, pathspec.GitIgnoreSpec.from_lines(lines))]


def _file_key(path: Path, root: Path, cwd: Path) -> str:
    """Relative to the working directory when inside it, else to the folder above its root."""
    base = cwd if path.is_relative_to(cwd) else root.parent
    return path.relative_to(base).as_posix()


def _md5(path: Path) -> str:
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if stamp not in _MD5:
        _MD5[stamp] = file_md5(path)
    return _MD5[stamp]


# ---------------------------------------------------------------- the environment trials run in

TAG_ENV_VERSION = "hpsweep.env_version"
IMAGE_DIGEST_ENV = "HPSWEEP_IMAGE_DIGEST"  # trials run in a container image: the image is the environment


def env_version(spec: ModelSpec | None = None) -> str:
    """Hash of the Python environment a trial runs in: its interpreter's version and every installed
    distribution's name and version; or of the container image when ``HPSWEEP_IMAGE_DIGEST`` is set.

    A command run by another Python interpreter than hpsweep's (``command: [/opt/conda/bin/python, …]``)
    is hashed by asking that interpreter.
    """
    digest = os.environ.get(IMAGE_DIGEST_ENV, "").strip()
    if digest:
        return _sha256("image", digest)[:16]
    exe = _other_python(spec)
    return _sha256(*(_listing_of(exe) if exe else _own_listing()))[:16]


def environment_listing() -> list[str]:
    """The interpreter and every installed distribution, one ``name==version`` each, sorted.

    Stdlib only, imports inside: its source is also run by another interpreter (``env_version``).
    """
    import importlib.metadata
    import platform
    import re

    dists = set()
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        if meta["Name"]:
            dists.add(re.sub(r"[-_.]+", "-", meta["Name"]).lower() + "==" + str(meta["Version"]))
    return [f"{platform.python_implementation()} {platform.python_version()}", *sorted(dists)]


_LISTING: dict[tuple, list[str]] = {}


def _own_listing() -> list[str]:
    """``environment_listing()``, remembered while no folder on sys.path changes (an install or an
    upgrade adds and removes ``*.dist-info`` folders, which changes their folder's mtime)."""
    stamp = tuple((p, os.stat(p).st_mtime_ns) for p in sys.path if p and os.path.isdir(p))
    if stamp not in _LISTING:
        _LISTING.clear()
        _LISTING[stamp] = environment_listing()
    return _LISTING[stamp]


def _other_python(spec: ModelSpec | None) -> str | None:
    """The interpreter a command trainer names, when it is not the one running hpsweep."""
    command = spec.trainer.command if spec is not None else None
    if not command or not _PYTHON.fullmatch(Path(command[0]).name):
        return None
    exe = shutil.which(command[0])
    if exe is None:
        return None
    ours = Path(os.path.abspath(sys.executable))
    theirs = Path(os.path.abspath(exe))
    if theirs == ours or (theirs.parent == ours.parent and os.path.realpath(theirs) == os.path.realpath(ours)):
        return None
    return exe


def _listing_of(exe: str) -> list[str]:
    """``environment_listing()`` as run by interpreter ``exe``; when it cannot say, the interpreter's
    path beside hpsweep's own environment."""
    source = inspect.getsource(environment_listing) + "\nimport json\nprint(json.dumps(environment_listing()))\n"
    try:
        done = subprocess.run([exe, "-c", source], capture_output=True, text=True, timeout=60, check=True)
        return list(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return [f"unreadable {exe}", *_own_listing()]


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's sha with '-dirty' when the tree has changes; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def trial_key(hparams: Hparams, spec_version: str, data_versions: str, code: str, env: str | None = None) -> str:
    """The trial's identity; ``env`` (the environment's version) is a part when given."""
    parts = [canonical_json(hparams), spec_version, data_versions, code] + ([env] if env is not None else [])
    return _sha256(*parts)[:24]
