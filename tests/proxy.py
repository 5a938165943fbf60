"""A loopback TCP proxy that can lose a reply: the "applied but never confirmed" fault."""

from __future__ import annotations

import contextlib
import socket
import threading


class ReplyCuttingProxy:
    """Forwards 127.0.0.1:port to a target. `cut_next_reply()` arms it: the next request is
    forwarded, and the client's connection is then closed before the reply reaches it, so the
    client cannot tell whether the request was applied (it was)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._armed = threading.Event()
        self.cuts = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> None:
        self._accept.start()

    def cut_next_reply(self) -> None:
        self._armed.set()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(2)
        self._accept.join(2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, replies, client), daemon=True
                )
                self._threads.append(t)
                t.start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, replies: bool, client: socket.socket
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if replies and self._armed.is_set():
                    # The request went through and Redis answered: drop the answer and the
                    # client's connection instead of delivering it.
                    self._armed.clear()
                    self.cuts += 1
                    client.shutdown(socket.SHUT_RDWR)
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
