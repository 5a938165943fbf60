"""Loopback TCP proxies in front of a redis-server, for faults Redis itself cannot produce:
a reply lost after Redis applied the request, and a Redis that answers late."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class _Proxy:
    """Forwards 127.0.0.1:port to a target port, one thread per direction and connection.

    Subclasses see each request chunk (`_on_request`) and decide about each reply chunk
    (`_on_reply`: return False to cut the client's connection instead of delivering it)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> None:
        self._accept.start()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(2)
        self._accept.join(2)

    def retarget(self, port: int) -> None:
        """New connections go to `port` from now on (existing ones are left alone)."""
        self._target = port

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()  # the target is down: the client sees a reset, as with Redis
                continue
            self._sockets += [client, upstream]
            state: dict[str, object] = {}  # per connection: what the subclass remembers
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, replies, client, state), daemon=True
                )
                self._threads.append(t)
                t.start()

    def _on_request(self, data: bytes, state: dict[str, object]) -> None:
        pass

    def _on_reply(self, data: bytes, state: dict[str, object]) -> bool:
        return True

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        replies: bool,
        client: socket.socket,
        state: dict[str, object],
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not replies:
                    self._on_request(data, state)
                elif not self._on_reply(data, state):
                    client.shutdown(socket.SHUT_RDWR)
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class ReplyCuttingProxy(_Proxy):
    """`cut_next_reply()` arms it: the reply to the next EVALSHA that Redis *applied* (an
    array reply, not an error such as NOSCRIPT) is dropped and the client's connection
    closed, so the client cannot tell whether the request was applied (it was). The replies
    it cut are kept in `cut_replies`."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._armed = threading.Event()
        self.cut_replies: list[bytes] = []

    @property
    def cuts(self) -> int:
        return len(self.cut_replies)

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def cut_next_reply(self) -> None:
        self._armed.set()

    def _on_request(self, data: bytes, state: dict[str, object]) -> None:
        # One command at a time per connection (the writer waits for each reply); the name
        # is in the first bytes of its first chunk: *N\r\n$7\r\nEVALSHA\r\n
        if b"\r\nEVALSHA\r\n" in data[:32].upper():
            state["evalsha"] = True

    def _on_reply(self, data: bytes, state: dict[str, object]) -> bool:
        evalsha = state.pop("evalsha", False)
        if self._armed.is_set() and evalsha and data.startswith(b"*"):
            self._armed.clear()
            self.cut_replies.append(data)
            return False
        return True


class SlowReplyProxy(_Proxy):
    """Delays every reply by `delay(request_bytes)` seconds, where request_bytes is the size
    of the request it answers: a Redis (or a network) slower than the client's timeout."""

    def __init__(self, target_port: int, delay: Callable[[int], float]) -> None:
        super().__init__(target_port)
        self.delay = delay
        self.delayed = 0  # replies held back

    def _on_request(self, data: bytes, state: dict[str, object]) -> None:
        pending = state.get("request", 0)
        assert isinstance(pending, int)
        state["request"] = pending + len(data)

    def _on_reply(self, data: bytes, state: dict[str, object]) -> bool:
        size = state.pop("request", 0)
        assert isinstance(size, int)
        if size:  # the first chunk of a reply
            seconds = self.delay(size)
            if seconds > 0:
                self.delayed += 1
                self._stop.wait(seconds)  # cut short by stop()
        return not self._stop.is_set()
