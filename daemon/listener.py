"""The vhost-user socket the daemon listens on, and the one error type of
start-up.

``open_listener(config)`` listens on ``--socket-path`` (a stale socket file
nobody listens on is replaced; anything else at the path is an error; with
``--socket-group`` the socket is made 0660 under a temporary name and
renamed into place) or adopts the listening socket inherited as ``--fd``
(libvirt). The supervisor accepts exactly one connection on it and then
closes it (``Listener.close``), removing the socket file it created.

``StartupError``: a reason not to start that the user can fix, printed as
one line by the CLI.
"""

from __future__ import annotations

import grp
import os
import socket
import stat

from daemon.config import Config


class StartupError(Exception):
    """The daemon cannot start for a reason the user can fix; the message is
    printed as one line (``pyvirtiofsd: error: ...``)."""


class Listener:
    """The listening socket. Once QEMU is connected, ``close``
    closes it and removes the socket file (as the Rust virtiofsd does): one
    connection per daemon, and no stale file for the next daemon to find."""

    __slots__ = ("sock", "path", "inode")

    def __init__(self, sock: socket.socket | None, path: str | None, inode: int | None = None):
        self.sock = sock
        self.path = path            # the socket file we created, removed when we stop listening
        self.inode = inode          # ... unless someone replaced it meanwhile

    def fileno(self) -> int:
        assert self.sock is not None            # only asked while listening
        return self.sock.fileno()

    def close(self) -> None:
        # the name goes first: nobody finds a path that refuses connections
        if self.path is not None:
            try:
                if os.lstat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self.path = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_SUN_PATH_MAX = 108     # sizeof(sockaddr_un.sun_path), the NUL included


def open_listener(config: Config) -> Listener:
    if config.socket_fd is not None:
        return _adopt_listener(config.socket_fd)
    path = config.socket_path
    assert path is not None                     # the CLI requires --socket-path or --fd
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # made and set listening under a temporary name, then renamed into
    # place: whoever finds the path (QEMU, libvirt polling for it) can
    # connect at once, and with --socket-group (members of GROUP may
    # connect: the Rust daemon's 0660) never finds other permissions
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        if len(os.fsencode(temporary)) >= _SUN_PATH_MAX and config.socket_group is None:
            sock.bind(path)     # no room for the suffix in sun_path: in place
            sock.listen(1)
        else:
            sock.bind(temporary)
            try:
                sock.listen(1)
                if config.socket_group is not None:
                    os.chown(temporary, -1, grp.getgrnam(config.socket_group).gr_gid)
                    os.chmod(temporary, 0o660)
                os.rename(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        inode = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {e.strerror or e}") from None
    return Listener(sock, path, inode)


def _adopt_listener(fd: int) -> Listener:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise StartupError(f"--fd {fd}: {e.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        sock.detach()
        raise StartupError(f"--fd {fd}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise StartupError(f"--fd {fd}: not a listening UNIX stream socket")
    return Listener(sock, None)


def claim_socket_path(path: str) -> None:
    """A socket file nobody listens on is a leftover: remove it. Anything
    else at that path is someone else's (StartupError). Also for
    ``--metrics-socket``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StartupError(f"socket path {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"socket path {path} exists and is not a socket")
    if _someone_listens(path):
        raise StartupError(f"socket path in use: {path}")
    try:
        os.unlink(path)
    except OSError as e:
        raise StartupError(f"cannot remove stale socket {path}: {e.strerror}") from None


def _someone_listens(path: str) -> bool:
    # /proc/net/unix first: connecting would be taken as *the* connection by
    # a one-shot backend (another virtiofsd) waiting for its QEMU.
    names = {path, os.path.abspath(path)}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000 = listening
                if len(fields) >= 8 and fields[7] in names and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        pass
    # Bound in another network namespace or by a relative name: ask the socket.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except TimeoutError:
        return True            # a listener with a full backlog
    except OSError as e:
        raise StartupError(f"socket path {path}: {e.strerror}") from None
    finally:
        probe.close()
