"""Settings refuse what they do not know, and the API imports nothing heavy before it is used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_an_unknown_keyword_is_an_error_naming_the_nearest_field() -> None:
    with pytest.raises(ValidationError, match=r"unknown setting storage_dir .*did you mean storage_url\?"):
        Settings(storage_dir="/tmp/store")  # type: ignore[call-arg]


def test_an_unknown_variable_is_an_error_naming_the_nearest_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_BATCH_WAIT", "3")
    with pytest.raises(ValidationError, match=r"LETHE_BATCH_WAIT .*did you mean LETHE_BATCH_WAIT_S\?"):
        Settings()
    monkeypatch.delenv("LETHE_BATCH_WAIT")
    monkeypatch.setenv("LETHE_NOTHING_LIKE_IT", "1")
    with pytest.raises(ValidationError, match=r"unknown setting LETHE_NOTHING_LIKE_IT \(environment"):
        Settings()


def test_known_variables_and_the_test_and_bench_ones_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_PAGE_SIZE_MAX", "7")
    monkeypatch.setenv("LETHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    assert Settings().page_size_max == 7


def test_an_unknown_dotenv_entry_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LETHE_RETRY_AFTER_SECOND=5\n")
    with pytest.raises(ValidationError, match=r"retry_after_second .*did you mean retry_after_seconds\?"):
        Settings()


def test_an_api_with_the_in_process_worker_imports_neither_torch_nor_matplotlib(tmp_path: Path) -> None:
    # torch loads with the first job the in-process worker runs, matplotlib with the first PDF report.
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.core.settings import Settings\n"
        f"create_app(Settings(database_url='sqlite:///{tmp_path}/db.sqlite', dispatcher='inprocess',"
        f" storage_url='{tmp_path}/store'))\n"
        "heavy = {'torch', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
