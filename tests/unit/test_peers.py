"""daemon/fuse/peers.py: what C reads of a worker's Peers on every cold
LOOKUP and RELEASE (``shared``, ``copied``) are plain attributes that
follow the other workers and the keeper as they come and go."""

import os
import socket

from daemon.fuse.peers import Peers


def test_shared_and_copied_follow_the_workers_and_the_keeper():
    peers = Peers()
    assert (peers.shared, peers.copied) == (False, False)
    assert "shared" in vars(peers) and "copied" in vars(peers)      # no property for C to run
    try:
        peers.add(6, os.pidfd_open(os.getpid()))
        peers.add(7, os.pidfd_open(os.getpid()))
        assert (peers.shared, peers.copied) == (True, True)
        peers.remove(6)
        assert (peers.shared, peers.copied) == (True, True)
        peers.remove(7)
        assert (peers.shared, peers.copied) == (False, False)
        keeper, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        answers, answer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peers.set_keeper(9, keeper.detach(), answers.detach(), answer_end.detach())
        assert (peers.shared, peers.copied) == (False, True)
        peers.add(8, os.pidfd_open(os.getpid()))
        assert (peers.shared, peers.copied) == (True, True)
        peers._drop_keeper()
        assert (peers.shared, peers.copied) == (True, True)
        peers.remove(8)
        assert (peers.shared, peers.copied) == (False, False)
        theirs.close()
    finally:
        peers.close()
    assert (peers.shared, peers.copied) == (False, False)
