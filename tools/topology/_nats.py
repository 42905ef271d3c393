"""A real NATS server with JetStream for the relay's tests and examples: Debian's
``nats-server`` package (``make nats`` installs it), started as ``nats-server -js -a
127.0.0.1 -p PORT -sd DIR`` on a reserved loopback port with its store in its own
directory, ready once it logs ``Server is ready``, stopped by PID. The port and the
store are kept across restarts, so clients reconnect to the same URL and find their
streams."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from accord.tools.topology._process import ManagedProcess, ProcessFailed, free_port

_READY_LINE = "Server is ready"


def nats_server_binary() -> str:
    """``$ACCORD_NATS_SERVER_BIN``, else ``nats-server`` on the PATH (or in
    ``/usr/sbin``, where Debian's package puts it)."""
    explicit = os.environ.get("ACCORD_NATS_SERVER_BIN")
    if explicit:
        return explicit
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if found:
        return found
    raise ProcessFailed(
        "no nats-server binary: install Debian's nats-server package (make nats) "
        "or set ACCORD_NATS_SERVER_BIN"
    )


class NatsServer(ManagedProcess):
    """One ``nats-server`` with JetStream on 127.0.0.1:``port`` (reserved when 0), its
    store in ``store_dir``; :attr:`url` is what clients connect to."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        name: str = "nats",
        log_path: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        argv = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        argv += ["-sd", str(self.store_dir), "-n", name]
        super().__init__(name, argv, log_path=log_path, ready_prefix=_READY_LINE)
        self.url = f"nats://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        # nats-server prefixes its log lines with "[pid] date time [INF]".
        time.sleep(0.05)
        return any(_READY_LINE in line for line in list(self._tail))

    def start(self, timeout_s: float = 30.0) -> NatsServer:
        super().start(timeout_s)
        return self
