"""One module per implemented channel; each has a ``handle(session, message)``."""
