"""The `ldct-node` subcommands, one module per command, each with add_arguments(parser) and run(args)."""
