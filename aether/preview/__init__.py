"""Preview routing: ``{port}-{prefix}.{previewDomain}`` proxied to what listens on ``port``.

The proxy itself (:mod:`.core`, with :mod:`.proxy` and :mod:`.upstream` moving the bytes)
knows nothing of workspaces: what it needs from whoever runs it is in :mod:`.owner` (a decider,
a connector, a sink). :mod:`.service` is the workspace's owner: :mod:`.gate` decides what to do
with a request head (pure, no I/O), :mod:`.local` knows the addresses an upstream may have,
:mod:`.visibility` keeps which ports are public. :mod:`.headers` rewrites heads both ways and
:mod:`.pages` are the error pages a browser sees, for any owner.
"""
