"""The few git questions `mlops diff` and `mlops promote` ask about the repository holding the specs."""
from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from mlops_spec.errors import SpecError


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, check=False)
    except FileNotFoundError:
        raise SpecError(file=cwd, field="", message="git is not installed; it is needed to read specs at a revision") from None


def _git_message(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("fatal: ") if lines else f"git exited with {result.returncode}"


def repo_root(path: Path) -> Path:
    """The top folder of the git work tree that holds `path`."""
    result = _git(path, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise SpecError(file=path, field="", message=f"not inside a git work tree ({_git_message(result)})")
    return Path(result.stdout.decode().strip())


def materialise(folder: Path, ref: str, destination: Path) -> Path:
    """Extract `folder` as committed at `ref` into `destination`; returns where it landed."""
    root = repo_root(folder)
    relative = folder.resolve().relative_to(root.resolve())
    resolved = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if resolved.returncode != 0:
        raise SpecError(file=root, field="", message=f"'{ref}' is not a git revision of this repository "
                                                     "(a branch, tag, commit or e.g. origin/main)")
    archive = _git(root, "archive", "--format=tar", resolved.stdout.decode().strip(), "--", relative.as_posix())
    if archive.returncode != 0:
        raise SpecError(file=root, field="", message=f"{relative} does not exist at revision '{ref}' "
                                                     f"({_git_message(archive)})")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return destination / relative


def has_uncommitted_changes(file: Path) -> bool:
    """True when `file` differs from HEAD in the work tree or the index, or is untracked."""
    root = repo_root(file.parent)
    result = _git(root, "status", "--porcelain", "--", str(file.resolve().relative_to(root.resolve())))
    if result.returncode != 0:
        raise SpecError(file=file, field="", message=f"git status failed: {_git_message(result)}")
    return bool(result.stdout.strip())
