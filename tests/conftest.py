import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The planted tiny world on disk (tests/tiny_world.py), shared by the whole session."""
    from tiny_world import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_reference(tiny_world):
    """An uninterrupted `refusalscope run` of the tiny world in its own process, and how many atomic
    writes and checkpoint appends it made: what interrupted and broken runs are compared with."""
    from faults import run_cli

    counts = tiny_world / "counts.json"
    proc = run_cli(f"count:{counts}", "run", "-c", str(tiny_world / "cfg.yaml"), "-r",
                   str(tiny_world / "reference"), "-q")
    assert proc.returncode == 0, proc.stderr
    return tiny_world / "reference", json.loads(counts.read_text())


@pytest.fixture(scope="session")
def tiny_run(tiny_reference):
    """A whole pipeline run (every stage, analysis and the dashboards) on the tiny planted world,
    made once per session: what the report, web-app and dashboard tests read. Treat it as
    read-only; copy it (`shutil.copytree`) to change anything."""
    return tiny_reference[0]


@pytest.fixture(scope="session")
def hydra_run(tmp_path_factory):
    """A whole pipeline run on the planted world with redundant refusal (tests/planted_hydra.py):
    a dormant latent wakes up once the active ones are ablated. Read-only, like `tiny_run`."""
    from tiny_world import run_pipeline, write_tiny_world

    world = write_tiny_world(tmp_path_factory.mktemp("hydra-world"), hydra=True)
    run_pipeline(world, world / "run")
    return world / "run"
