"""Read a daemon's ``--metrics-socket``: connect, read the Prometheus text
to EOF, parse it with prometheus_client (the guest metrics test and the
root bench's per-phase request counts)."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families


def scrape(path: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value}."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    out = {}
    for fam in text_string_to_metric_families(b"".join(chunks).decode()):
        for sample in fam.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    """The value of sample ``name`` with exactly ``labels`` in a ``scrape``
    result, 0 if it is not there."""
    return samples.get((name, frozenset(labels.items())), 0)
