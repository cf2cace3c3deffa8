"""Subcommands of the ``entrodrop`` CLI: one module each, with ``register(subparsers)``."""
