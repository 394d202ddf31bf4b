"""Shared test fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def shared_dir() -> Path:
    """``../shared`` beside the checkout (CI) or ``/work/shared`` (developer machines)."""
    for candidate in (REPO.parent / "shared", Path("/work/shared")):
        if (candidate / "reference").is_dir():
            return candidate
    raise FileNotFoundError("the shared/ folder (reference state dicts) is not beside the checkout")


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def run_cli():
    """Run ``detkit ARGS`` in a subprocess from the repo root; returns CompletedProcess (text)."""
    import subprocess

    def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        return subprocess.run(
            [sys.executable, "-m", "detkit.cli", *args],
            capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout,
        )

    return _run


@pytest.fixture
def timm_plugin() -> None:
    """Import the detkit-timm plugin from the source tree, which registers the ``timm`` backbone (tests/
    test_plugin_timm.py installs it with pip as a user would)."""
    source = str(REPO / "plugins" / "detkit-timm")
    sys.path.insert(0, source)
    try:
        import detkit_timm  # noqa: F401
    finally:
        sys.path.remove(source)


@pytest.fixture(autouse=True)
def no_network_downloads(monkeypatch):
    """The suite stays offline: a download of anything but a ``file://`` URL (the COCO recipes name real weights)
    fails at once, as an unreachable host would; tests point the recipes at files they make instead."""
    import urllib.error
    import urllib.parse

    import torch.hub

    real = torch.hub.download_url_to_file

    def download(url: str, dst: str, *args, **kwargs):
        if urllib.parse.urlparse(url).scheme != "file":
            raise urllib.error.URLError(f"network downloads are disabled in the tests (asked for {url})")
        return real(url, dst, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
