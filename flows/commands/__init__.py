"""One module per `facets` subcommand: `configure(parser)` and `run(args) -> int`."""
