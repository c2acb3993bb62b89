"""A PgBouncer of the test's own, started on a free loopback port in front of the test server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.tcp_forwarder import free_port

CONFIG_TEMPLATE = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/userlist.txt
pool_mode = {pool_mode}
default_pool_size = 20
max_client_conn = 300
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


class PgBouncer:
    """One PgBouncer process in ``pool_mode``, relaying every database of the server at ``url``."""

    def __init__(self, url: str, pool_mode: str) -> None:
        executable = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(executable):
            raise RuntimeError("pgbouncer is not installed: apt-get install -y pgbouncer")
        server = make_url(url)
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="sgp-pgbouncer-"))
        user = server.username or "postgres"
        (self.folder / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            CONFIG_TEMPLATE.format(
                host=server.host or "127.0.0.1",
                port=server.port or 5432,
                listen_port=self.port,
                folder=self.folder,
                pool_mode=pool_mode,
            )
        )
        command = [executable, str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer will not run as root; the Debian package's user owns the folder.
            shutil.chown(self.folder, "postgres")
            for child in self.folder.iterdir():
                shutil.chown(child, "postgres")
            command[1:1] = ["-u", "postgres"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"pgbouncer did not listen on port {self.port}: {self.log()}")

    def url_for(self, url: str) -> str:
        """Return ``url`` rewritten to reach the same database through this PgBouncer."""
        rewritten = make_url(url).set(host="127.0.0.1", port=self.port)
        return rewritten.render_as_string(hide_password=False)

    def log(self) -> str:
        log_file = self.folder / "pgbouncer.log"
        return log_file.read_text() if log_file.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
