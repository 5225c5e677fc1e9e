"""One module per CLI command; each registers itself on ``smarttrim_cli.cli.app``."""
