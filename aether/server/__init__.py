"""``aether serve``: the workspace's WebSocket API (docs/protocol.md), its channels (ports,
terminal, files, agent, config) over one authenticated connection per client, the REST API of
the port registry, the dashboard and the metrics, with the preview proxy on the same port."""
