"""Preview routing: ``{port}-{prefix}.{previewDomain}`` proxied to what listens on ``port``.

:mod:`.gate` decides what to do with a request head (pure, no I/O); :mod:`.headers` rewrites
heads both ways; :mod:`.proxy` and :mod:`.upstream` move the bytes; :mod:`.pages` are the
error pages a browser sees; :mod:`.visibility` keeps which ports are public; :mod:`.local`
knows the addresses an upstream may have; :mod:`.service` holds what the connections share.
"""
