"""A TCP proxy in front of a real Redis that can lose one reply: the command reaches Redis and runs, but
the connection drops before its reply reaches the client (a network cut at the worst moment)."""

import socket
import threading


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:port to target; drop_reply_containing(marker) cuts the connection that next
    carries marker from Redis, instead of passing those bytes on."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_reply_containing(self, marker: bytes) -> None:
        self.marker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_redis: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_redis and self.marker is not None and self.marker in data:
                    self.marker, self.dropped = None, self.dropped + 1
                    break  # Redis has run the command; its reply goes nowhere
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
