"""`ldct-node echo`: C-ECHO the configured destinations, the administrator's first check.

    ldct-node echo [--config FILE] [NAME ...]

One line per destination; exit status 0 when every destination answered success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pynetdicom.status import Status

from ldct_node.config import load_config
from ldct_node.errors import CommandError
from ldct_node.node.send import echo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration (default: embedded default)")
    parser.add_argument("names", nargs="*", metavar="NAME", help="destinations to echo (default: all)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    destinations = cfg.send.destinations
    if not destinations:
        raise CommandError("no destination configured: add a [[send.destinations]] table (name, ae_title, host, port)")
    unknown = sorted(set(args.names) - {d.name for d in destinations})
    if unknown:
        known = ", ".join(d.name for d in destinations)
        raise CommandError(f"unknown destination {', '.join(unknown)} (configured: {known})")
    all_ok = True
    for dest in destinations:
        if args.names and dest.name not in args.names:
            continue
        started = time.monotonic()
        status = echo(dest, cfg.send)
        ms = (time.monotonic() - started) * 1000
        target = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
        if status == Status.SUCCESS:
            print(f"{target}: ok, {ms:.0f} ms")
        elif status is None:
            print(f"{target}: FAILED, no association (wrong host/port/AE title, or not allowed to call it as "
                  f"{cfg.send.ae_title})")
        else:
            print(f"{target}: FAILED, C-ECHO status 0x{status:04X}")
        all_ok = all_ok and status == Status.SUCCESS
    return 0 if all_ok else 1
