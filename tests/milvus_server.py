"""A Milvus 2.3.5 standalone server from the PyPI `milvus` package, for the slow backend tests and the search-backend
benchmark: its configuration rendered from the package's template with every advertised address and etcd on
127.0.0.1, the binary started with Popen in its own session, stopped by PID.

Milvus 2.3.5 has no setting for the address its gRPC components listen on: they listen on every interface (etcd on
127.0.0.1 only). So the server starts only in a network namespace whose one interface is the loopback
(`unshare --net`, as scripts/test.sh runs the slow tests), where "every interface" is 127.0.0.1.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


ISOLATION_HINT = (
    "Milvus 2.3.5 listens on every network interface: start it only in a network namespace with the loopback alone, "
    "e.g. `sudo unshare --net sh -c 'ip link set lo up && ...'` (scripts/test.sh does this for the slow tests)"
)


def network_interfaces() -> list[str]:
    """The interfaces of this process's network namespace (/proc/net/dev, unlike /sys, is per namespace)."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def loopback_only() -> bool:
    return network_interfaces() == ["lo"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MilvusServer:
    """Milvus 2.3.5 standalone from the `milvus` package in the folder `base` (configuration, binary, data, logs)."""

    def __init__(self, base: Path):
        if not loopback_only():
            raise RuntimeError(f"{ISOLATION_HINT}; this namespace has {network_interfaces()}")
        import milvus

        self.base = base
        config = milvus.MilvusServerConfig(data_dir=str(base))
        config.resolve()  # free ports (probed on 127.0.0.1) and the data folders under `base`
        config.write_config()
        config.cleanup_listen_ports()
        milvus._initialize_data_files(config.base_data_dir)  # the server binary and its libraries
        path = base / "configs" / "milvus.yaml"
        text = path.read_text().replace("localhost", "127.0.0.1")
        text = text.replace("  ip: #", "  ip: 127.0.0.1 #")
        path.write_text(text)
        self.port = int(config.get("proxy_port"))
        self.health_port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 120) -> None:
        binary = self.base / "bin" / "milvus"
        env = dict(
            os.environ,
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.health_port),
            MILVUS_RUN_DIR=str(self.base / "run"),
            LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        )
        log = open(self.base / "logs" / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(binary), "run", "standalone"], cwd=self.base, env=env, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Milvus server exited with {self.process.returncode}; see {self.base}/logs")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the Milvus server did not answer its health check within {timeout:.0f} s")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to its PID, SIGKILL after `timeout` s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
