"""End-to-end latency with and without streaming (queue.stream), one fresh node each, same files.

    python -m bench.bench_stream [--series DIR] [--weights shipped|tiny|PATH] [--pace 0]
                                 [--chunk 16] [--quiet-period 2] [--json bench/results/stream.json]

A scanner sends the series to the node (DCMTK storescu as fast as it can, or with --pace N a
pynetdicom SCU that sends N instances per second over one association, as a scanner does while it
reconstructs); the node sends the derived series to a DCMTK storescp. Latency is from the last
source instance received (its queue row) to the last derived instance stored at storescp (file
time). With streaming the goal is latency <= one chunk's compute + one chunk's send, both taken
from the node's own log lines ("chunk derived while receiving", "streamed chunk sent"; the
largest of the run). Prints a table and writes JSON stating the machine.

Where denoising is slower than the series arrives (the shipped student on a CPU, unpaced) no
node can meet that goal: streaming then saves the quiet period and the overlap with receiving,
and --pace shows the case where the network keeps up, as on a GPU server.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from bench.bench_network import (
    arguments,
    log_events,
    machine,
    source_files,
    start_node,
    timed_storescu,
    wait_done,
    weights_path,
    write_result,
)
from tests import peers


def paced_send(files: list[Path], port: int, called_aet: str, per_second: float) -> None:
    """C-STORE the files over one association, one every 1/per_second seconds."""
    syntaxes = sorted({str(pydicom.filereader.read_file_meta_info(p).TransferSyntaxUID) for p in files})
    ae = AE(ae_title="SCANNER")
    ae.maximum_pdu_size = peers.DCMTK_MAX_PDU
    ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate(peers.LOOPBACK, port, ae_title=called_aet)
    if not assoc.is_established:
        raise SystemExit("the node refused the paced sender's association")
    start = time.monotonic()
    try:
        for i, path in enumerate(files):
            time.sleep(max(0.0, start + i / per_second - time.monotonic()))
            status = assoc.send_c_store(path)
            if int(status.Status) != 0:
                raise SystemExit(f"the node answered 0x{int(status.Status):04X} for {path.name}")
    finally:
        assoc.release()


def one_run(files: list[Path], workdir: Path, weights: Path | None, stream: bool, chunk: int,
            quiet_period_s: float, pace: float) -> dict:
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    name = "stream" if stream else "quiet-period"
    with peers.running_storescp(workdir / f"pacs-{name}", aet="PACS") as pacs:
        node = start_node(workdir / f"node-{name}", weights, [pacs.destination("pacs")], quiet_period_s,
                          {"inference": {"chunk_slices": chunk}, "queue": {"stream": stream}})
        try:
            if pace > 0:
                paced_send(files, node.port, node.ae_title, pace)
            else:
                timed_storescu(files, node.port, node.ae_title)
            row = wait_done(node, series_uid, 1)
            chunks = log_events(node, "chunk derived while receiving")
            chunk_sends = log_events(node, "streamed chunk sent")
            delivered = log_events(node, "series delivered")[-1]
        finally:
            node.stop()
        last_at_pacs = max(p.stat().st_mtime for p in pacs.received())
    latency = last_at_pacs - row["last_received_at"]
    result = {"mode": name, "slices": row["slices"], "latency_s": round(latency, 2),
              "receive_s": round(row["last_received_at"] - row["first_received_at"], 2),
              "close_run_denoise_s": round(row["denoise_seconds"], 2), "close_delivery_s": float(delivered["seconds"]),
              "close_delivery_instances": delivered["instances"], "chunks": len(chunks)}
    if stream:
        compute = max((float(c["seconds"]) for c in chunks), default=0.0)
        send = max((float(c["seconds"]) for c in chunk_sends), default=0.0)
        result.update(largest_chunk_slices=max((c["slices"] for c in chunks), default=0),
                      chunk_compute_s=round(compute, 3), chunk_send_s=round(send, 3),
                      goal_s=round(compute + send, 3), goal_met=latency <= compute + send)
    return result


def print_report(result: dict) -> None:
    print(f"machine: {result['machine']}")
    print(f"data: {result['data']}  ({result['instances']} instances)   model: {result['model']}")
    print(f"sender: {result['settings']['sender']}   chunk_slices: {result['settings']['chunk_slices']}"
          f"   quiet period: {result['settings']['quiet_period_s']} s")
    print()
    print(f"{'mode':>13s}{'latency s':>11s}{'receive s':>11s}{'chunks':>8s}{'chunk s':>9s}{'send s':>8s}"
          f"{'goal s':>8s}{'met':>5s}")
    for r in result["runs"]:
        streamed = "stream" == r["mode"]
        print(f"{r['mode']:>13s}{r['latency_s']:11.2f}{r['receive_s']:11.2f}{r['chunks']:8d}"
              + (f"{r['chunk_compute_s']:9.3f}{r['chunk_send_s']:8.3f}{r['goal_s']:8.3f}{'yes' if r['goal_met'] else 'no':>5s}"
                 if streamed else f"{'':>9s}{'':>8s}{'':>8s}{'':>5s}"))


def main() -> None:
    parser = arguments(__doc__, "stream.json")
    parser.add_argument("--pace", type=float, default=0.0, help="instances/s the scanner sends; 0: storescu at full speed")
    parser.add_argument("--chunk", type=int, default=16, help="inference.chunk_slices of the node")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ldct-bench-") as tmp:
        workdir = Path(tmp)
        files, data = source_files(args.series, workdir)
        weights, model = weights_path(args.weights, workdir)
        sender = f"pynetdicom SCU at {args.pace:g} instances/s" if args.pace > 0 else "DCMTK storescu, full speed"
        result = {"benchmark": "stream", "machine": machine(), "data": data, "instances": len(files), "model": model,
                  "settings": {"sender": sender, "chunk_slices": args.chunk, "quiet_period_s": args.quiet_period}}
        result["runs"] = [one_run(files, workdir, weights, stream, args.chunk, args.quiet_period, args.pace)
                          for stream in (False, True)]
    print_report(result)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
