"""``aether serve``: the workspace's WebSocket API (seed 001), hosting the ``ports`` and
``config`` channels over one authenticated connection per client."""
