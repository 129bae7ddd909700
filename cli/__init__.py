"""The `lockn-tune` command line."""
