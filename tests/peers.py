"""Real DICOM peers on loopback, for the peer tests and the network benchmarks.

DCMTK (`storescu`, `storescp`, `echoscu`) plays scanner and PACS, Orthanc plays a PACS whose REST
API is queried afterwards, and `ldct-node serve` runs as a subprocess like it would under systemd.
Every process is started on a free loopback port and stopped by its process id.

Nothing here imports pytest, so `bench/` can use it too: a missing binary raises `PeerUnavailable`,
which the tests turn into a skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# pynetdicom installs its own storescu/storescp/echoscu that shadow DCMTK's on PATH, so DCMTK is
# always called by its Debian path.
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
ORTHANC = Path("/usr/sbin/Orthanc")
DCIODVFY = Path("/usr/bin/dciodvfy")

LOOPBACK = "127.0.0.1"
# Orthanc and the node import a lot before they listen; DCMTK's storescp is up in milliseconds.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
# DCMTK's largest PDU; used on both sides of a DCMTK transfer so the comparison is like for like.
DCMTK_MAX_PDU = 131072


class PeerUnavailable(RuntimeError):
    """A peer program is not installed here; tests skip, benchmarks stop with this message."""


class PeerFailed(RuntimeError):
    """A peer program did not start or did not answer in time."""


def require(binary: Path) -> Path:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise PeerUnavailable(f"{binary} is not installed")
    return binary


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: without TCP_NODELAY DCMTK stalls ~45 ms on every image."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it, so parallel runs differ)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(ready, what: str, proc: subprocess.Popen | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ready() until it is true; fail early with the log when proc exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise PeerFailed(f"{what} exited with status {proc.returncode} before it was ready")
        time.sleep(POLL_S)
    raise PeerFailed(f"{what} not ready after {timeout_s:g} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the process by its id, SIGKILL it when it does not exit in time; its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def kill_hard(proc: subprocess.Popen) -> None:
    """kill -9: the crash the node must survive."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def http_json(url: str, timeout_s: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- Orthanc -------------------------------------------------------------------------------------


def orthanc_config(workdir: Path, aet: str, dicom_port: int, http_port: int) -> dict:
    return {
        "Name": f"ldct-test-{aet}",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        # Answer C-STORE from any caller: the node's calling AE is not registered as a modality.
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
    }


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/{path.lstrip('/')}"

    def get(self, path: str):
        return http_json(self.url(path))

    def destination(self, name: str) -> dict:
        """This Orthanc as a `[send] destinations` entry of the node's configuration."""
        return {"name": name, "ae_title": self.aet, "host": LOOPBACK, "port": self.dicom_port}

    def series_by_uid(self) -> dict[str, dict]:
        """SeriesInstanceUID -> Orthanc's series resource (with its "Instances" list)."""
        series = self.get("series?expand")
        return {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in series}

    def instance_tags(self, orthanc_id: str) -> dict:
        """Tag keyword -> value, as Orthanc's "simplified" view gives them (sequences as lists)."""
        return self.get(f"instances/{orthanc_id}/simplified-tags")


@contextmanager
def running_orthanc(workdir: Path, aet: str = "ORTHANC") -> Iterator[Orthanc]:
    """An Orthanc with its own storage in workdir, up until its REST API answers."""
    require(ORTHANC)
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(workdir, aet, dicom_port, http_port), indent=2))
    log = open(workdir / "orthanc.log", "wb")
    proc = subprocess.Popen([str(ORTHANC), str(config)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    peer = Orthanc(aet, dicom_port, http_port, workdir, proc)
    try:
        wait_until(lambda: http_ok(peer.url("system")), "Orthanc", proc)
        yield peer
    finally:
        stop_process(proc)
        log.close()


# --- DCMTK ---------------------------------------------------------------------------------------


@dataclass
class StoreSCP:
    aet: str
    port: int
    out_dir: Path
    process: subprocess.Popen

    def destination(self, name: str) -> dict:
        """This storescp as a `[send] destinations` entry of the node's configuration."""
        return {"name": name, "ae_title": self.aet, "host": LOOPBACK, "port": self.port}

    def received(self) -> list[Path]:
        """The files stored so far (storescp writes them straight to their final name)."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


def storescp_command(out_dir: Path, aet: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    # +xa: take every transfer syntax DCMTK knows, like a PACS; -dhl: no reverse DNS per association.
    return [str(require(STORESCP)), "+xa", "-dhl", "-aet", aet, "-pdu", str(DCMTK_MAX_PDU),
            "-od", str(out_dir), *extra_args, str(port)]


@contextmanager
def running_storescp(out_dir: Path, aet: str = "STORESCP", port: int | None = None,
                     extra_args: Sequence[str] = ()) -> Iterator[StoreSCP]:
    """DCMTK storescp writing every received instance into out_dir; extra_args e.g. --sleep-during 1."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = storescp_command(out_dir, aet, port, extra_args)
    log = open(out_dir.parent / f"storescp-{port}.log", "wb")
    proc = subprocess.Popen(command, env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port), "storescp", proc)
        yield StoreSCP(aet, port, out_dir, proc)
    finally:
        stop_process(proc)
        log.close()


def storescu_command(files: Sequence[Path], port: int, called_aet: str, calling_aet: str = "STORESCU",
                     extra_args: Sequence[str] = (), host: str = LOOPBACK) -> list[str]:
    # -nh: carry on after a refused instance so one bad file does not hide the others' statuses.
    return [str(require(STORESCU)), "-nh", "-aet", calling_aet, "-aec", called_aet, "-pdu", str(DCMTK_MAX_PDU),
            *extra_args, host, str(port), *map(str, files)]


def storescu(files: Sequence[Path], port: int, called_aet: str, calling_aet: str = "STORESCU",
             extra_args: Sequence[str] = (), timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """Send files in one association with DCMTK storescu; the caller checks returncode and output."""
    command = storescu_command(files, port, called_aet, calling_aet, extra_args)
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s)


def start_storescu(files: Sequence[Path], port: int, called_aet: str, calling_aet: str = "STORESCU",
                   extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """storescu in the background, for killing the receiver while a transfer is under way."""
    command = storescu_command(files, port, called_aet, calling_aet, extra_args)
    return subprocess.Popen(command, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def echoscu(port: int, called_aet: str, calling_aet: str = "ECHOSCU", timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    command = [str(require(ECHOSCU)), "-v", "-aet", calling_aet, "-aec", called_aet, LOOPBACK, str(port)]
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s)


def dciodvfy_findings(output: str) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dicom3tools' validator output. A line may name its kind after a
    tag ('(0x0009,0x1001)  ?  - Warning - ...'), and 'Abort' (the file could not be read) is an error:
    a file the validator never read must not pass as one without errors."""
    lines = output.splitlines()
    errors = [line for line in lines if "Error" in line or line.startswith("Abort")]
    return errors, [line for line in lines if "Warning" in line]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dicom3tools' validator for the file."""
    out = subprocess.run([str(require(DCIODVFY)), str(path)], capture_output=True, text=True, timeout=60)
    return dciodvfy_findings(out.stdout + out.stderr)


# --- the node under test -------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value) and value:
        items = ", ".join("{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in item.items()) + " }" for item in value)
        return f"[{items}]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_text(tables: dict[str, dict]) -> str:
    """TOML for {section: {key: value}}; lists of dicts become inline tables (destinations, allowed)."""
    lines = []
    for section, table in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class Node:
    """`ldct-node serve` under test: its ports, data directory and process."""

    config_path: Path
    data_dir: Path
    ae_title: str
    port: int
    http_port: int
    log_path: Path
    process: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. NOTIFY_SOCKET, as systemd sets it

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/{path.lstrip('/')}"

    def health(self) -> tuple[int, dict]:
        """/healthz as (HTTP status, report); 503 is an answer too (e.g. a full spool)."""
        try:
            with urllib.request.urlopen(self.url("healthz"), timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def receiver_up(self) -> bool:
        try:
            return bool(self.health()[1].get("receiver_up"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "Node":
        """Start (or restart) the daemon and wait until /healthz says the receiver is up."""
        log = open(self.log_path, "ab")
        # The test's own environment must not leak a STATE_DIRECTORY: the config names the data directory.
        inherited = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self.process = subprocess.Popen(cli_command("serve", "--config", str(self.config_path)),
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_until(self.receiver_up, f"ldct-node serve (log: {self.log_path})",
                   self.process, timeout_s)
        return self

    def stop(self) -> int:
        return stop_process(self.process) if self.process else 0

    def kill(self) -> None:
        if self.process:
            kill_hard(self.process)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run another `ldct-node` subcommand on the same configuration (queue list/retry, echo)."""
        return subprocess.run(cli_command(*args, "--config", str(self.config_path)),
                              capture_output=True, text=True, timeout=timeout_s)


def cli_command(*args: str) -> list[str]:
    # The interpreter running the tests, not whatever `ldct-node` happens to be first on PATH.
    return [sys.executable, "-m", "ldct_node.cli", *args]


def node_tables(data_dir: Path, port: int, http_port: int, weights: Path | None, ae_title: str = "LDCT_NODE",
                destinations: Sequence[dict] = (), quiet_period_s: float = 1.0) -> dict[str, dict]:
    """A configuration for a node under test: loopback, CPU, one thread, short quiet period, fast retries.

    Returned as tables so that a caller changes a key before writing it (see `toml_text`);
    weights None leaves `[model]` out, i.e. the shipped weights."""
    tables = {
        # One thread: the test machine is shared, and the tiny model needs no more.
        "inference": {"device": "cpu", "threads": 1, "batch_size": 4},
        "receive": {"ae_title": ae_title, "host": LOOPBACK, "port": port, "min_free_bytes": 0},
        "send": {"ae_title": ae_title, "destinations": list(destinations), "attempts": 3,
                 "backoff_initial_s": 0.5, "backoff_max_s": 2.0,
                 "acse_timeout_s": 5.0, "dimse_timeout_s": 30.0, "network_timeout_s": 30.0},
        "queue": {"quiet_period_s": quiet_period_s, "poll_interval_s": 0.1},
        "storage": {"data_dir": data_dir},
        "http": {"enabled": True, "host": LOOPBACK, "port": http_port},
        "log": {"level": "info", "format": "json"},
    }
    if weights is not None:
        tables["model"] = {"weights": weights}
    return tables


def make_node(workdir: Path, tables: dict[str, dict]) -> Node:
    """Write the configuration into workdir and describe the node; `Node.start()` runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "ldct-node.toml"
    config_path.write_text(toml_text(tables))
    return Node(config_path=config_path, data_dir=Path(tables["storage"]["data_dir"]),
                ae_title=tables["receive"]["ae_title"], port=tables["receive"]["port"],
                http_port=tables["http"]["port"], log_path=workdir / "node.log")
