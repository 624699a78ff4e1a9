"""Where the repository is, and the environment a test's subprocesses need."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

#: The test stage ``misbehaving`` (tests/support/misbehaving.py), registered for this process and every
#: subprocess it starts (tests/conftest.py sets it before ``stages`` is first imported).
TEST_STAGES = "misbehaving=tests.support.misbehaving"


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the repo importable (for tests.* stages) from any cwd."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
