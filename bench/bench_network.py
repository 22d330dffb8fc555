"""Network benchmarks of the node against DCMTK, side by side in one run, on the same files.

    python -m bench.bench_network [--series DIR] [--weights shipped|tiny|PATH] [--repeats 3]
                                [--e2e-runs 2] [--quiet-period 2] [--json bench/results/network.json]

- receive: DCMTK storescu sends the series to `ldct-node serve` and, in turn, to DCMTK storescp and
  to Orthanc: over one association, and split over PARALLEL associations at once (aggregate rate).
  Targets: one association >= 0.5 x storescp, parallel >= 0.8 x storescp, >= 1.0 x Orthanc.
- send: the node's delivery of the derived series to a storescp (``send_series``, what every
  delivery attempt runs, in this process) against storescu sending the very same derived files to a
  fresh storescp; instances/s and ratio.
- end to end: from the last instance received to the last derived instance stored at the
  destination, split into quiet period (+ worker pick-up), denoise and send.

Both sides use the same PDU limit (DCMTK's maximum, 128 kB) and TCP_NODELAY. The node makes
every instance durable (fsync + rename + SQLite commit) before answering; storescp does not
fsync, so the receive ratio is conservative. Each timed transfer starts after os.sync(), so that no
receiver pays for writing back the files another left in the page cache. Default data: the shared 134-slice series
(Pancreatic-CT-CBCT-SEG, TCIA, CC BY 4.0); without it a synthetic 512x512 series of the same size.
Prints a table and writes JSON, both stating the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom

from ldct_node import __version__
from ldct_node.config import Destination, SendSettings, load_config
from ldct_node.node.jobs import JobStore, SeriesState
from ldct_node.node.send import send_series
from tests import peers, synthetic

REPO = Path(__file__).resolve().parents[1]

SHARED_SERIES = REPO.parent / "shared" / "data" / "pancreas-ct-cb001"
SYNTHETIC_SLICES = 134
SYNTHETIC_SIZE = 512
# The node must not start denoising while the receive rate is measured.
RECEIVE_ONLY_QUIET_S = 3600.0
DELIVERY_TIMEOUT_S = 1800.0
SEND_TARGET = 0.8
# Receive targets: (reference, associations) -> minimum node/reference ratio.
RECEIVE_TARGETS = {("storescp", 1): 0.5, ("storescp", 8): 0.8, ("orthanc", 1): 1.0, ("orthanc", 8): 1.0}
PARALLEL = 8


def machine() -> dict:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    dcmtk = subprocess.run([str(peers.STORESCP), "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(), "python": platform.python_version(), "ldct_node": __version__,
        "dcmtk": dcmtk[0].strip("$ ") if dcmtk else "unknown",
    }


def source_files(series: Path | None, workdir: Path) -> tuple[list[Path], str]:
    if series is None and (SHARED_SERIES / "1-001.dcm").is_file():
        series = SHARED_SERIES
    if series == SHARED_SERIES:
        return sorted(series.glob("*.dcm")), f"{series} (Pancreatic-CT-CBCT-SEG, TCIA, CC BY 4.0; cite per Citations.txt)"
    if series is not None:
        return sorted(p for p in series.iterdir() if p.suffix == ".dcm"), str(series)
    datasets = synthetic.ct_series(SYNTHETIC_SLICES, rows=SYNTHETIC_SIZE, columns=SYNTHETIC_SIZE)
    files = synthetic.write_series(workdir / "synthetic", datasets)
    return files, f"synthetic {SYNTHETIC_SLICES} x {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE}"


def weights_path(choice: str, workdir: Path) -> tuple[Path | None, str]:
    """(path for [model] weights, description): 'shipped' (None), 'tiny' (random TSC-Net) or a file."""
    if choice == "shipped":
        return None, "shipped student weights"
    if choice == "tiny":
        from ldct_node.net.model import TSCNet, TSCNetConfig
        from ldct_node.net.weights import ModelCard, save_weights

        settings = TSCNetConfig(width=4, num_dems=2)
        path = workdir / "tiny.safetensors"
        save_weights(TSCNet(settings), ModelCard(name="tiny-random", version="0", architecture="tscnet",
                                                 settings=settings.to_dict()), path)
        return path, "tiny random TSC-Net (width 4, 2 DEMs): network speed, not model speed"
    return Path(choice), choice


def timed_storescu(files: list[Path], port: int, called_aet: str) -> float:
    start = time.perf_counter()
    result = peers.storescu(files, port, called_aet)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"storescu to {called_aet} failed: {result.stderr.strip()[-500:]}")
    return seconds


def start_node(workdir: Path, weights: Path | None, destinations: list[dict], quiet_period_s: float,
               overrides: dict[str, dict] | None = None) -> peers.Node:
    """`ldct-node serve` as benchmarked; overrides: settings per table, e.g. {"queue": {"stream": True}}."""
    tables = peers.node_tables(workdir / "data", peers.free_port(), peers.free_port(), weights,
                               destinations=destinations, quiet_period_s=quiet_period_s)
    # Like for like with DCMTK, whose PDU cannot exceed 128 kB.
    tables["receive"]["max_pdu"] = tables["send"]["max_pdu"] = peers.DCMTK_MAX_PDU
    tables["inference"]["threads"] = 0  # all cores: measured as it would run, not as a polite test neighbour
    for table, values in (overrides or {}).items():
        tables[table].update(values)
    return peers.make_node(workdir, tables).start()


def timed_parallel_storescu(files: list[Path], port: int, called_aet: str, associations: int) -> float:
    """Seconds for `associations` storescu processes, each with its share of the files, all at once;
    each calls with its own AE title, as separate modalities would."""
    shares = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [peers.start_storescu(share, port, called_aet, calling_aet=f"BENCH{i}") for i, share in enumerate(shares)]
    outputs = [proc.communicate()[0] for proc in procs]
    seconds = time.perf_counter() - start
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"storescu to {called_aet} failed: {output.strip()[-500:]}")
    return seconds


def timed_receive(files: list[Path], port: int, called_aet: str, associations: int) -> float:
    if associations == 1:
        return timed_storescu(files, port, called_aet)
    return timed_parallel_storescu(files, port, called_aet, associations)


def bench_receive(files: list[Path], workdir: Path, weights: Path | None, repeats: int) -> list[dict]:
    """The node against storescp and Orthanc, over one and PARALLEL associations, in one run."""
    node = start_node(workdir / "node-receive", weights, [], RECEIVE_ONLY_QUIET_S)
    rows = []
    try:
        with peers.running_storescp(workdir / "storescp-receive") as scp, peers.running_orthanc(workdir / "orthanc") as orthanc:
            receivers = {"node": (node.port, node.ae_title), "storescp": (scp.port, scp.aet),
                         "orthanc": (orthanc.dicom_port, orthanc.aet)}
            for port, aet in receivers.values():
                timed_storescu(files, port, aet)  # warm-up: page cache, first association
            for associations in (1, PARALLEL):
                seconds: dict[str, list[float]] = {name: [] for name in receivers}
                for _ in range(repeats):  # in turn, so drifting machine load hits all alike
                    for name, (port, aet) in receivers.items():
                        # storescp and Orthanc leave their files to the kernel's writeback; without this
                        # the node's next fsyncs wrote back the references' files too (ext4 journals them
                        # together): a third of the node's one-association rate in some runs.
                        os.sync()
                        seconds[name].append(timed_receive(files, port, aet, associations))
                for reference in ("storescp", "orthanc"):
                    rows.append(rates(f"receive, {associations} assoc.", len(files), seconds["node"], seconds[reference],
                                      RECEIVE_TARGETS[(reference, associations)], reference))
        # storescu exits 0 whatever the statuses: an instance the node did not store would pass for speed.
        failed = log_events(node, "instance refused") + log_events(node, "instance not stored")
        if failed:
            raise SystemExit(f"the node did not store {len(failed)} of the instances sent (first: "
                             f"{failed[0].get('reason')}); see {node.log_path}")
    finally:
        node.stop()
    return rows


def rates(what: str, count: int, node_s: list[float], reference_s: list[float], target: float, reference: str) -> dict:
    node_rate = count / statistics.median(node_s)
    reference_rate = count / statistics.median(reference_s)
    return {"what": what, "reference": reference, "instances": count, "node_seconds": node_s,
            "reference_seconds": reference_s, "node_instances_per_s": round(node_rate, 1),
            "node_instances_per_s_range": [round(count / max(node_s), 1), round(count / min(node_s), 1)],
            "reference_instances_per_s": round(reference_rate, 1), "ratio": round(node_rate / reference_rate, 3),
            "target_ratio": target, "statistic": "median"}


def log_events(node: peers.Node, name: str) -> list[dict]:
    """The node's JSON log lines of one event, oldest first."""
    events = []
    for line in node.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            events.append(event)
    return events


def wait_done(node: peers.Node, series_uid: str, run: int) -> dict:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    queue = JobStore(load_config(node.config_path).storage.database)
    try:
        while time.monotonic() < deadline:
            row = queue.series(series_uid)
            if row and row.run == run and row.state == SeriesState.DONE:
                return row.to_dict()
            if row and row.state == SeriesState.FAILED:
                raise SystemExit(f"the node failed the series: {row.reason}")
            time.sleep(0.1)
    finally:
        queue.close()
    raise SystemExit(f"series not delivered within {DELIVERY_TIMEOUT_S:g} s; see {node.log_path}")


def bench_end_to_end(files: list[Path], workdir: Path, weights: Path | None, runs: int, quiet_period_s: float,
                     repeats: int) -> tuple[list[dict], dict]:
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    splits = []
    with peers.running_storescp(workdir / "storescp-e2e", aet="PACS") as pacs:
        node = start_node(workdir / "node-e2e", weights, [pacs.destination("pacs")], quiet_period_s)
        try:
            for run in range(1, runs + 1):  # a re-sent series is a new run with the same derived UIDs
                timed_storescu(files, node.port, node.ae_title)
                row = wait_done(node, series_uid, run)
                delivered = log_events(node, "series delivered")[-1]
                last_stored = max(p.stat().st_mtime for p in pacs.received())
                splits.append(split(row, delivered, last_stored, run))
        finally:
            node.stop()
        derived = pacs.received()
    return splits, bench_send(derived, workdir, repeats)


def bench_send(derived: list[Path], workdir: Path, repeats: int) -> dict:
    """The sender's send_series (what each delivery runs) and storescu, each to a fresh storescp per
    run, alternating, after one warm-up of each."""
    settings = SendSettings(max_pdu=peers.DCMTK_MAX_PDU)
    node_s, dcmtk_s = [], []
    for run in range(repeats + 1):
        with peers.running_storescp(workdir / f"send-node-{run}", aet="PACS") as scp:
            destination = Destination("pacs", scp.aet, peers.LOOPBACK, scp.port)
            start = time.perf_counter()
            send_series(derived, destination, settings)
            node_s.append(time.perf_counter() - start)
        with peers.running_storescp(workdir / f"send-dcmtk-{run}", aet="PACS") as scp:
            dcmtk_s.append(timed_storescu(derived, scp.port, scp.aet))
    return rates("send", len(derived), node_s[1:], dcmtk_s[1:], SEND_TARGET, "storescu")


def split(row: dict, delivered: dict, last_stored: float, run: int) -> dict:
    """Seconds from the last instance received to the last derived instance stored, by stage."""
    total = last_stored - row["last_received_at"]
    quiet = row["queued_at"] - row["last_received_at"]
    pickup = row["started_at"] - row["queued_at"]
    denoise = row["denoise_seconds"]
    send = float(delivered["seconds"])
    return {"run": run, "slices": row["slices"], "total_s": round(total, 2), "quiet_period_s": round(quiet, 2),
            "worker_pickup_s": round(pickup, 2), "denoise_s": round(denoise, 2), "send_s": round(send, 2),
            "other_s": round(total - quiet - pickup - denoise - send, 2)}


def print_report(result: dict) -> None:
    print(f"machine: {result['machine']}")
    print(f"data: {result['data']}  ({result['instances']} instances)   model: {result['model']}")
    print()
    # The range: on a small shared machine one run can be far off the median, and the table says so.
    print(f"{'':20s}{'node inst/s':>12s}{'(range)':>15s}{'reference':>11s}{'ref inst/s':>12s}{'ratio':>8s}{'target':>8s}")
    for row in [*result["receive"], result["send"]]:
        low, high = row["node_instances_per_s_range"]
        print(f"{row['what']:20s}{row['node_instances_per_s']:12.1f}{f'({low:.0f}-{high:.0f})':>15s}{row['reference']:>11s}"
              f"{row['reference_instances_per_s']:12.1f}{row['ratio']:8.2f}{row['target_ratio']:8.2f}")
    print()
    print(f"{'run':>3s}{'total s':>9s}{'quiet':>8s}{'pickup':>8s}{'denoise':>9s}{'send':>8s}{'other':>8s}")
    for s in result["end_to_end"]:
        print(f"{s['run']:3d}{s['total_s']:9.2f}{s['quiet_period_s']:8.2f}{s['worker_pickup_s']:8.2f}"
              f"{s['denoise_s']:9.2f}{s['send_s']:8.2f}{s['other_s']:8.2f}")


def arguments(description: str, results: str) -> argparse.ArgumentParser:
    """The options the network benchmarks share; results: the default JSON file's name."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=Path, help="folder of one CT series (default: the shared series)")
    parser.add_argument("--weights", default="shipped", help="shipped, tiny (random, network speed only) or a path")
    parser.add_argument("--quiet-period", type=float, default=2.0, help="queue.quiet_period_s of the node")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / results)
    return parser


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {path}")


def main() -> None:
    parser = arguments(__doc__, "network.json")
    parser.add_argument("--repeats", type=positive, default=3, help="timed transfers per side; the median counts")
    parser.add_argument("--e2e-runs", type=positive, default=2,
                        help="times the series goes through the whole node (at least 1: the send case sends its output)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ldct-bench-") as tmp:
        workdir = Path(tmp)
        files, data = source_files(args.series, workdir)
        weights, model = weights_path(args.weights, workdir)
        result = {"benchmark": "network", "machine": machine(), "data": data, "instances": len(files),
                  "bytes": sum(p.stat().st_size for p in files), "model": model,
                  "settings": {"max_pdu": peers.DCMTK_MAX_PDU, "tcp_nodelay": True, "quiet_period_s": args.quiet_period,
                               "repeats": args.repeats, "parallel_associations": PARALLEL}}
        result["receive"] = bench_receive(files, workdir, weights, args.repeats)
        result["end_to_end"], result["send"] = bench_end_to_end(files, workdir, weights, args.e2e_runs,
                                                                args.quiet_period, args.repeats)
    print_report(result)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
