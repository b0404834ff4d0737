import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A whole pipeline run (every stage and analysis) on the tiny planted world, made once per
    session: what the report, web-app and dashboard tests read. Treat it as read-only; copy it
    (`shutil.copytree`) to change anything."""
    from tiny_world import run_pipeline, write_tiny_world

    world = write_tiny_world(tmp_path_factory.mktemp("tiny_world"))
    run_pipeline(world, world / "run")
    return world / "run"
