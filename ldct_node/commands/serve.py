"""`ldct-node serve`: run the node until SIGTERM/SIGINT, telling systemd when it is ready, feeding
its watchdog while every part is alive, and saying when it stops."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ldct_node.config import load_config
from ldct_node.logs import configure_logging, get_logger
from ldct_node.node.daemon import Node, lock_data_dir, sd_notify, watchdog_interval_s

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML configuration (default: the embedded default: loopback, per-user data directory)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    configure_logging(cfg.log.level, cfg.log.format)
    lock_fd = lock_data_dir(cfg.storage.data_dir)  # noqa: F841 - held open (and locked) until the process ends
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node = Node(cfg)
    node.start()
    log.info("node ready", ae_title=cfg.receive.ae_title, port=node.receiver.port, data_dir=str(cfg.storage.data_dir),
             destinations=[d.name for d in cfg.send.destinations])
    sd_notify("READY=1\nSTATUS=receiving")
    watchdog = watchdog_interval_s()
    try:
        while not stop.wait(watchdog or cfg.queue.poll_interval_s):
            if watchdog and node.alive():
                sd_notify("WATCHDOG=1")
    finally:
        sd_notify("STOPPING=1")
        log.info("node stopping")
        node.stop()
    return 0
