"""Process-level settings the server applies before it listens, and how listening fails."""

from __future__ import annotations

import errno
import os
import resource
import socket

import pytest

from gateway.http.app import StartupError
from gateway.http.server import listening_socket, raise_open_files_limit


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    assert raise_open_files_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (80, "cannot listen on 127.0.0.1:80: permission denied (ports below 1024 need "
             "privileges: use a higher port behind a front proxy)"),
        (8080, "cannot listen on 127.0.0.1:8080: permission denied"),
    ],
)  # fmt: skip
def test_permission_denied_on_the_port_says_why(
    monkeypatch: pytest.MonkeyPatch, port: int, expected: str
) -> None:
    """Wherever the test runs (root binds anything): the kernel's EACCES, as bind() gives it."""

    def refused(*_args: object, **_kwargs: object) -> socket.socket:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(socket, "create_server", refused)
    with pytest.raises(StartupError) as excinfo:
        listening_socket("127.0.0.1", port, 16)
    assert str(excinfo.value) == expected
