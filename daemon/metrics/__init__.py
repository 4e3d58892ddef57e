"""``--metrics-socket``: what the daemon is doing, for Prometheus.

counters.py: the shared-memory slots workers count into; exposition.py:
the text the supervisor renders from them; server.py: the socket it
answers on.
"""
