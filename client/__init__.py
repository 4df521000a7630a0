"""sol's Python client library and the `sol` command line."""
