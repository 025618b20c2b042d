"""Process-level settings the server applies before it listens."""

from __future__ import annotations

import resource

from gateway.server import raise_open_files_limit


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    assert raise_open_files_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard
