"""An embedded PostgreSQL for tests and the benchmark: a folder pgserver can use, and a way to stop it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path


def traversable_tempdir(prefix: str) -> Path:
    """A new temporary folder that the ``pgserver`` system user can enter (pgserver runs postgres as it under root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))
    folder.chmod(0o755)
    return folder


def stop_embedded_server(pgdata: Path) -> None:
    """Stop a pgserver-started PostgreSQL in ``pgdata`` if it runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return
    user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None
    with contextlib.suppress(Exception):
        pgserver.pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
