"""Property-based fuzzing, `ci` profile (a few dozen examples per target, derandomized): config files
from the schema, prompt files of every format, and CLI options end in exit 0 or 2 with one line that
names the fix, never a traceback, writing nothing outside the run. The `long` profile (>= 2,000
examples per target) is benchmark B12: benchmarks/fuzz_b12.py. See tests/fuzzing.py."""

from __future__ import annotations

import pytest
from fuzzing import TARGETS, check, make_sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def sandbox(tiny_world, tiny_reference, tmp_path_factory):
    return make_sandbox(tmp_path_factory.mktemp("fuzz"), tiny_world, tiny_reference[0])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzzed_input_ends_in_exit_0_or_one_line(sandbox, target):
    @settings(settings.get_profile("ci"))
    @given(data=st.data())
    def one(data):
        out, shown = TARGETS[target](sandbox, data)
        check(out, lambda: f"{target} example: {shown}")

    one()
