"""One module per `apr` subcommand: `setup_parser(p)` and `main(args)`."""
