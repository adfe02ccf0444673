"""aether: a workspace daemon that sees TCP ports open and close as it happens."""

__version__ = "0.1.0"
