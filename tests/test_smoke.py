"""The smoke subset (`pytest -m smoke`) that CI also runs on the lowest declared versions and on
newer Pythons: backfill, update and export end to end, and the package without pandas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_soda import FakeSoda
from tests.helpers import NAMES, cli, exact

pytestmark = pytest.mark.smoke


def test_backfill_update_export_without_pandas(
    soda: FakeSoda, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's whole path (to a folder and to S3) runs where `import pandas` fails."""
    monkeypatch.setitem(sys.modules, "pandas", None)
    res = cli("backfill", "--source", soda.url, "--dest", dest, "--page-size", "900")
    assert res.code == 0, res.text
    for dataset_id in NAMES.values():
        soda.insert(dataset_id, 30)
        soda.edit(dataset_id, 20)
    res = cli("update", "--source", soda.url, "--dest", dest, "--page-size", "300")
    assert res.code == 0, res.text
    for i, name in enumerate(NAMES):
        exact(soda, dest, name, tmp_path, ".parquet" if i % 2 else ".csv")


def test_read_and_fetch_name_the_pandas_extra_and_nothing_else_loads_pandas() -> None:
    code = """
import sys
sys.modules["pandas"] = None  # as where it is not installed
import nyc_collisions, nyc_collisions.aws, nyc_collisions.cli
from click.testing import CliRunner
assert CliRunner().invoke(nyc_collisions.cli.main, ["--help"]).exit_code == 0
for name in ("read", "fetch"):
    try:
        getattr(nyc_collisions, name)("crashes")
    except ImportError as exc:
        print(exc)
    else:
        raise SystemExit(name + "() did not refuse")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for name, line in zip(("read", "fetch"), lines, strict=True):
        assert f"{name}()" in line
        assert "pip install 'nyc-collisions[pandas]'" in line

    # and where pandas is installed, importing the package, the CLI and the handler leaves it be
    probe = "import sys, nyc_collisions.aws, nyc_collisions.cli; print('pandas' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
