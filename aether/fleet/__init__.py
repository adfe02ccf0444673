"""Fleet mode: one preview domain for many workspace VMs, routed by stateless gateways over Redis.

Each VM's :mod:`.publisher` keeps its workspace (prefix, advertised address, ports, names) in
Redis, changing it in one atomic script per change (:mod:`.keys`, in the format of :mod:`.blob`)
that also appends to one change stream. Each gateway's :mod:`.follower` holds the whole table in
memory (:mod:`.routes`, pure), and :mod:`.gate` decides each request from it without a lookup.
:mod:`.auth` holds the fleet key and what it signs; :mod:`.connection` makes Redis clients from
URLs (Sentinel too); :mod:`.status` is ``aether fleet status``.

Nothing here is imported unless fleet mode is configured: ``redis`` is only loaded by
:mod:`.connection`, :mod:`.publisher`, :mod:`.follower` and :mod:`.status`.
"""
