"""One module per ``qft`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
