"""The `ldct-node` command. Each subcommand lives in the module that does its work; this table
only names them, and a subcommand's module is imported when it runs, so `ldct-node echo` does
not pay for importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from ldct_node.errors import UserError

# name: (module, help). The module provides add_arguments(parser) and run(args) -> exit status.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "denoise": ("ldct_node.commands.denoise", "denoise the CT series in a folder tree into derived series"),
    "serve": ("ldct_node.commands.serve", "run the DICOM node: receive, denoise, send back to PACS"),
    "worker": ("ldct_node.commands.worker", "scale-out worker host: denoise series taken from the [broker] queue"),
    "queue": ("ldct_node.commands.queue", "list, retry or purge the node's jobs"),
    "echo": ("ldct_node.commands.echo", "C-ECHO the configured destinations"),
    "simulate": ("ldct_train.simulate", "simulate low-dose CT from normal-dose DICOM in the projection domain"),
    "prepare": ("ldct_train.bank", "prepare the training noise bank from a local copy of the manifest's data"),
    "train": ("ldct_train.trainer", "two-stage teacher-student training"),
    "evaluate": ("ldct_train.evaluate", "evaluation report on a held-out set"),
}


def _top_parser() -> argparse.ArgumentParser:
    from ldct_node import __version__

    parser = argparse.ArgumentParser(
        prog="ldct-node",
        description="DICOM node that denoises low-dose CT with the TSC-Net student network.",
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ldct-node {__version__}")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ldct-node {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # one line the user can act on; any other exception is a bug and shows its traceback
        print(f"ldct-node {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
