"""Modules loaded by importing the package and by a run at head, checked in fresh processes.

A run that finds the database at head takes no lock and migrates nothing, so
it must not pay for importing the lock, migration, ledger and pre-flight
modules. The checks look at ``sys.modules`` and never at timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import alembic_sgp_lock
from tests.support import EXAMPLE_HEAD, make_project, read_state

# Modules that neither the package import nor a run at head needs.
DEFERRED_MODULES = (
    "alembic_sgp_lock._exit_codes",
    "alembic_sgp_lock._ledger",
    "alembic_sgp_lock._lock",
    "alembic_sgp_lock._marker",
    "alembic_sgp_lock._migrate",
    "alembic_sgp_lock._pooler",
    "alembic_sgp_lock._preflight",
    "alembic_sgp_lock._recovery",
    "alembic_sgp_lock._transaction_lock",
    "sqlalchemy.dialects.mysql",
    # importlib.metadata parses METADATA with it when __version__ is read.
    "email.parser",
)

# Runs {code}, then prints the names of the loaded modules as the last line.
MODULES_SCRIPT = """
import json, sys
{code}
print(json.dumps(sorted(sys.modules)))
"""

# Resolves every public name, records whether it is the same object as in the
# module that defines it, and lists what a star import binds.
RESOLVE_SCRIPT = """
import importlib, json
import alembic_sgp_lock

resolved = {}
for name in alembic_sgp_lock.__all__:
    value = getattr(alembic_sgp_lock, name)
    module = getattr(value, "__module__", None)
    same = None
    if module and module.startswith("alembic_sgp_lock."):
        same = getattr(importlib.import_module(module), name) is value
    resolved[name] = same
namespace = {}
exec("from alembic_sgp_lock import *", namespace)
print(json.dumps({"resolved": resolved, "star": sorted(set(namespace) - {"__builtins__"})}))
"""


def _run_python(
    script: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished


def _last_line(finished: subprocess.CompletedProcess[str]) -> str:
    return finished.stdout.strip().splitlines()[-1]


def test_package_import_defers_modules() -> None:
    finished = _run_python(MODULES_SCRIPT.format(code="import alembic_sgp_lock"))
    loaded = set(json.loads(_last_line(finished)))

    assert "alembic_sgp_lock" in loaded
    for module in DEFERRED_MODULES:
        assert module not in loaded, f"importing alembic_sgp_lock loaded {module}"


def test_public_names_resolve() -> None:
    result = json.loads(_last_line(_run_python(RESOLVE_SCRIPT)))

    assert sorted(result["resolved"]) == sorted(alembic_sgp_lock.__all__)
    for name, same in result["resolved"].items():
        assert same is not False, f"alembic_sgp_lock.{name} is not its module's object"
    assert result["star"] == sorted(alembic_sgp_lock.__all__)


def test_lazy_names_listed_by_dir() -> None:
    for name in alembic_sgp_lock.__all__:
        assert name in dir(alembic_sgp_lock), name


def test_version_is_string() -> None:
    assert isinstance(alembic_sgp_lock.__version__, str)
    assert alembic_sgp_lock.__version__


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        alembic_sgp_lock.no_such_name  # noqa: B018


@pytest.mark.postgresql
def test_upgrade_at_head_defers_modules(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    first = project.run("upgrade", "head")
    assert first.returncode == 0, first.output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]

    # The same command as `alembic upgrade head`, in-process, so that the
    # module list is read after the run.
    command = (
        "from alembic.config import main\n"
        f"main(argv=['-c', {str(project.ini)!r}, 'upgrade', 'head'])"
    )
    finished = _run_python(
        MODULES_SCRIPT.format(code=command), cwd=project.path, env=project.environment()
    )
    loaded = set(json.loads(_last_line(finished)))

    assert "nothing to migrate, lock not taken" in finished.stderr, finished.stderr
    assert "alembic_sgp_lock._hook" in loaded
    for module in DEFERRED_MODULES:
        assert module not in loaded, f"an upgrade at head loaded {module}"
