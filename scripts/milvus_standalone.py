"""A real Milvus standalone server for tests and benchmarks: the `milvus` package's 2.3.5 binary, on loopback,
with its data in a folder of ours. One per machine (its embedded etcd's peer port 2380 is fixed).

    python scripts/milvus_standalone.py DATA_DIR [--port 19530]     # runs until Ctrl+C, then stops it

The package's own `milvus-server` command is a Python wrapper around the binary; a SIGTERM to the wrapper has
left the binary running (see FACTS). Here the binary is our direct child, in its own process group, so stopping
it is one signal to one group, followed by SIGKILL when it does not exit in time. `kill()` is the SIGKILL the
fault tests use; `start()` again on the same folder brings the same data back.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

MILVUS_VERSION = "2.3.5"  # the release the suite runs on (requirements/dev.txt pins the package)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MilvusStandalone:
    """start() / kill() / stop(); a context manager that always stops what it started."""

    def __init__(self, data: Path, port: int = 0) -> None:
        self.data = Path(data).resolve()
        self.port = port or free_port()
        self.health_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []
        self._command: list[str] | None = None
        self._env: dict[str, str] = {}

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 180) -> None:
        """Start the binary on our folder and wait until it answers calls (7-60 s here)."""
        deadline = time.monotonic() + timeout
        if self._command is None:
            self._first_start()
        else:
            # Again on the same folder, ports and config. Not through the package: its port check binds without
            # SO_REUSEADDR, so after a kill it refuses for a minute while old connections sit in TIME_WAIT
            # (the binary itself binds fine).
            logs = self.data / "logs"
            self._logs = [open(logs / f"milvus-{name}.log", "a", encoding="utf-8") for name in ("stdout", "stderr")]
            self._proc = subprocess.Popen(self._command, cwd=self.data, env=self._env, stdout=self._logs[0],
                                          stderr=self._logs[1], start_new_session=True)
        self._wait_ready(deadline)

    def _first_start(self) -> None:
        from milvus import MilvusServer, MilvusServerConfig  # the milvus package: only where a server is run

        if not port_is_free(2380):  # the embedded etcd's fixed peer port
            raise RuntimeError("port 2380 is taken: is another Milvus server running on this machine?")
        config = MilvusServerConfig(data_dir=str(self.data), proxy_port=self.port, etcd_log_level="warn")
        server = MilvusServer(config, wait_for_started=False)
        with warnings.catch_warnings():  # its port probing leaves sockets for the garbage collector
            warnings.simplefilter("ignore", ResourceWarning)
            server.start()  # resolves ports, writes configs/milvus.yaml, extracts the binary, spawns it
            gc.collect()
        assert server.server_proc is not None
        self._proc, server.server_proc = server.server_proc, None  # ours now: the package's __del__ kills it
        self._logs = list(server.proc_fds.values())
        server.proc_fds.clear()
        self.health_port = server.webservice_port
        binary = server.get_milvus_executable_path()
        self._command = [binary, "run", "standalone"]
        self._env = os.environ | {
            "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.health_port),
            "MILVUS_RUN_DIR": str(self.data / "run"),
            "LD_LIBRARY_PATH": ":".join([os.path.dirname(binary), os.environ.get("LD_LIBRARY_PATH", "")]),
        }

    def _wait_ready(self, deadline: float) -> None:
        from pymilvus import MilvusClient

        health = f"http://127.0.0.1:{self.health_port}/healthz"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"the Milvus server exited at start; see {self.data / 'logs'}")
            try:
                with urllib.request.urlopen(health, timeout=5) as resp:
                    if b"OK" in resp.read():
                        client = MilvusClient(self.uri, timeout=10)
                        client.list_collections()
                        client.close()
                        return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Milvus server did not answer within the start timeout; see {self.data}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed."""
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None
        self._close_logs()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group, then SIGKILL whatever is left after `timeout`."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
            self._proc = None
        self._close_logs()

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # the binary and anything it started
        except (ProcessLookupError, PermissionError):
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs = []

    def __enter__(self) -> MilvusStandalone:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--port", type=int, default=19530)
    args = parser.parse_args()
    with MilvusStandalone(args.data, args.port) as server:
        print(f"Milvus {MILVUS_VERSION} standalone at {server.uri} (pid {server.pid}); Ctrl+C stops it", flush=True)
        try:
            while server.pid is not None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
