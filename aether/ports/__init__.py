"""Listening TCP ports of this network namespace: what is open now, and as it changes.

The public surface is :class:`~aether.ports.monitor.PortMonitor` (live events) and
:class:`~aether.ports.sockdiag.DiagSocket` (one snapshot); the rest is their machinery.
"""

#: How ports are watched: ``auto`` (eBPF where the probe loads, else sock_diag), ``ebpf`` (the
#: probe or nothing) or ``sockdiag`` (snapshots alone).
BACKENDS = ("auto", "ebpf", "sockdiag")
#: How the probe's records reach user space: ``auto`` (a ring buffer on 5.8+), ``ring`` or ``perf``.
EBPF_BUFFERS = ("auto", "ring", "perf")
