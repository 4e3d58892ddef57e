"""The Prometheus text exposition of the workers' counters (counters.py)
and the supervisor's own figures.

Every metric name, label name and label value printed comes from this
module's tables (opcode names from abi.Opcode, errno names from the errno
module, worker names from the vring index) or from the supervisor (restart
reasons): a worker's slot contributes numbers only.
"""

from __future__ import annotations

import errno
import itertools

from daemon.fuse import abi
from daemon.metrics import counters as c
from daemon.workers.pool import worker_name

PREFIX = "pyvirtiofsd_"

_OPNAMES = {int(op): op.name for op in abi.Opcode}
_ERRNAMES = {n: errno.errorcode.get(n, f"E{n}") for n in range(1, c.ERRNO_SLOTS)}


def _opname(slot: int) -> str:
    return _OPNAMES.get(slot, "OTHER") if slot else "OTHER"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _seconds(ns: int) -> str:
    return repr(ns / 1e9)


class _Family:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name = PREFIX + name
        self.lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {kind}"]

    def add(self, labels: dict, value, suffix: str = "") -> None:
        text = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
        self.lines.append(f"{self.name}{suffix}{{{text}}} {value}" if text else f"{self.name}{suffix} {value}")


def render(area: c.MetricsArea, *, uptime_s: float, inodes: int, inode_capacity: int,
           restarts: dict[tuple[int, str], int], live: dict[int, int]) -> bytes:
    """The whole exposition. ``restarts``: (vring, reason) -> count;
    ``live``: vring -> pid of the workers running now."""
    fams = {
        "uptime": _Family("uptime_seconds", "gauge", "Seconds since the daemon started."),
        "inodes": _Family("inodes", "gauge", "Inodes the guest holds (nodeids it was told of and has not forgotten)."),
        "inode_cap": _Family("inode_table_size", "gauge", "The most inodes the guest may hold (--inode-table-size)."),
        "up": _Family("worker_up", "gauge", "1 when the worker of this vring is running."),
        "restarts": _Family("worker_restarts_total", "counter", "Workers that died or were killed, by why."),
        "req": _Family("requests_total", "counter", "FUSE requests served, by opcode."),
        "err": _Family("errors_total", "counter", "FUSE error replies, by opcode and errno."),
        "lat": _Family("request_duration_seconds", "histogram",
                       "Time a worker spent on a request, from decoding it to its reply written, by opcode."),
        "rd": _Family("read_bytes_total", "counter", "File data bytes read by the guest."),
        "wr": _Family("written_bytes_total", "counter", "File data bytes written by the guest."),
        "open": _Family("open_files", "gauge", "Host files the guest holds open through the worker."),
        "ifds": _Family("inode_fds", "gauge", "O_PATH inode file descriptors the worker holds."),
        "fdlim": _Family("fd_limit", "gauge", "The worker's RLIMIT_NOFILE."),
        "batch": _Family("queue_batch_size", "histogram",
                         "Requests found waiting on a queue per wake-up of its worker."),
        "maxb": _Family("queue_batch_size_max", "gauge", "The most requests one wake-up found waiting."),
        "polls": _Family("queue_polls_total", "counter",
                         "Polling windows after serving (--poll-max-us), by whether the next request came in one."),
        "pollsec": _Family("queue_poll_seconds_total", "counter", "Time the worker spent polling its queue."),
    }
    fams["uptime"].add({}, round(uptime_s, 3))
    fams["inodes"].add({}, inodes)
    fams["inode_cap"].add({}, inode_capacity)
    for (index, reason), n in sorted(restarts.items()):
        fams["restarts"].add({"worker": worker_name(index), "reason": reason}, n)
    for index in range(area.slots):
        w = area.slot(index)
        if not w[c.STARTS] and index not in live:
            continue          # no worker ever ran for this vring
        name = worker_name(index)
        wl = {"worker": name}
        fams["up"].add(wl, 1 if index in live else 0)
        fams["rd"].add(wl, w[c.BYTES_READ])
        fams["wr"].add(wl, w[c.BYTES_WRITTEN])
        fams["open"].add(wl, w[c.OPEN_FILES])
        fams["ifds"].add(wl, w[c.INODE_FDS])
        fams["fdlim"].add(wl, w[c.FD_LIMIT])
        fams["maxb"].add(wl, w[c.MAX_BATCH])
        fams["polls"].add({**wl, "outcome": "found"}, w[c.POLL_FOUND])
        fams["polls"].add({**wl, "outcome": "missed"}, w[c.POLL_MISSED])
        fams["pollsec"].add(wl, _seconds(w[c.POLL_NS]))
        hist = w[c.BATCH_HIST:c.BATCH_HIST + len(c.BATCH_BUCKETS) + 1].tolist()
        for le, total in zip(c.BATCH_BUCKETS, itertools.accumulate(hist)):
            fams["batch"].add({**wl, "le": repr(float(le))}, total, "_bucket")
        fams["batch"].add({**wl, "le": "+Inf"}, sum(hist), "_bucket")
        fams["batch"].add(wl, w[c.CHAINS], "_sum")
        fams["batch"].add(wl, sum(hist), "_count")
        for op in range(c.OPCODE_SLOTS):
            base = c.OPS + op * c.OP_WORDS
            n = w[base + c.OP_REQUESTS]
            errs = w[c.ERRORS + op * c.ERRNO_SLOTS:c.ERRORS + (op + 1) * c.ERRNO_SLOTS].tolist()
            if not n and not any(errs):
                continue
            ol = {**wl, "op": _opname(op)}
            fams["req"].add(ol, n)
            for e, count in enumerate(errs):
                if count:
                    fams["err"].add({**ol, "errno": _ERRNAMES.get(e, "OTHER") if e else "OTHER"}, count)
            buckets = w[base + c.OP_BUCKETS:base + c.OP_BUCKETS + len(c.LATENCY_BUCKETS_NS) + 1].tolist()
            for le, total in zip(c.LATENCY_BUCKETS_NS, itertools.accumulate(buckets)):
                fams["lat"].add({**ol, "le": _seconds(le)}, total, "_bucket")
            fams["lat"].add({**ol, "le": "+Inf"}, sum(buckets), "_bucket")
            fams["lat"].add(ol, _seconds(w[base + c.OP_LATENCY_SUM]), "_sum")
            fams["lat"].add(ol, sum(buckets), "_count")
    return ("\n".join(itertools.chain.from_iterable(f.lines for f in fams.values())) + "\n").encode()
