"""mypy over cuepipe as it is installed: ``python -m tests.support.typecheck``.

The repository keeps ``orchestrator/``, ``stages/``, ``models/`` and ``td/`` at its top, and the
package installs them as ``cuepipe.orchestrator`` ... (setuptools ``package-dir``). mypy cannot follow
setuptools' editable import mapping, so this links the four folders under a ``cuepipe/`` folder in a
temporary directory and runs ``mypy -p cuepipe`` there, with the repository's settings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.env import ROOT

PACKAGES = ("orchestrator", "stages", "models", "td")


def typecheck() -> subprocess.CompletedProcess[str]:
    """Run mypy on the linked view; OSError where this system cannot make symbolic links."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy") or "mypy"
    with tempfile.TemporaryDirectory(prefix="cuepipe-typecheck-") as tmp:
        view = Path(tmp) / "cuepipe"
        view.mkdir()
        for package in PACKAGES:
            (view / package).symlink_to(ROOT / package, target_is_directory=True)
        return subprocess.run([mypy, "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                               str(ROOT / ".mypy_cache"), "-p", "cuepipe"], cwd=tmp, capture_output=True,
                              text=True, timeout=300)


if __name__ == "__main__":
    result = typecheck()
    sys.stdout.write(result.stdout + result.stderr)
    sys.exit(result.returncode)
