"""Listening TCP ports of this network namespace: what is open now, and as it changes.

The public surface is :class:`~aether.ports.monitor.PortMonitor` (live events) and
:class:`~aether.ports.sockdiag.DiagSocket` (one snapshot); the rest is their machinery.
"""
