"""Shared fixtures: one local Ray for the whole session, the shared real test videos, ERROR logs fail tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared real videos with ground truth (../shared/testdata); skips with the reason when absent."""
    if not (TESTDATA / "truth.json").exists():
        pytest.skip(f"shared test videos not found at {TESTDATA} (they live beside the repository, in shared/)")
    return TESTDATA


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for the whole test session (2 CPUs, small object store); yields its address."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _fail_on_error_logs(caplog):
    """A test that logs at ERROR (from clipmill code) fails: errors must be handled, not just logged."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR and r.name.startswith("clipmill")]
    if errors:
        pytest.fail("ERROR logged: " + "; ".join(r.getMessage() for r in errors))


@pytest.fixture
def clipmill_env() -> dict[str, str]:
    """Environment for running the CLI in a subprocess (no inherited RAY_ADDRESS)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env
