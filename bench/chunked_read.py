"""The CPU of reading a chunked upload (no Content-Length) the way gunicorn hands it to the app: gunicorn's own
Body(ChunkedReader) over a socket-like source, under werkzeug's LimitedStream as request.stream wraps it.
werkzeug's get_data() (64 KB reads: what run_web_server.read_body does for a body of unknown length) against
reads of 1 MB (gunicorn's own largest step), per body and chunk size. Measured on 2026-12-07 and not taken:
1 MB reads cost 1.3-2 x more CPU, with the web's malloc setting (below) and without it (werkzeug's LimitedStream
fills a new buffer of the read's size at each read, and gunicorn copies its own buffers either way).

    python -m bench.chunked_read [--n 15]     (~2 s; no server: gunicorn's reader classes in this process)

gunicorn (27) hands a chunked body out of a buffer that it copies at each read; a body of known length is read
in one call for that reason (read_exactly), but for a chunked one no read size measured better. The source
gives at most 208 KB per recv(), what a loopback socket's buffer holds.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from gunicorn.http.body import Body, ChunkedReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.wsgi import LimitedStream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run_web_server import return_large_blocks_to_the_os  # noqa: E402

RECV_MAX = 212_992  # net.core.rmem_default: what one recv() of a loopback socket gives at most


class Socket:
    """What SocketUnreader needs of a socket: recv, from bytes."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def recv(self, size: int) -> bytes:
        out = self.data[self.pos : self.pos + min(size, RECV_MAX)]
        self.pos += len(out)
        return out


class Request:
    """The limits ChunkedReader reads from gunicorn's request (its defaults)."""

    limit_request_field_size = 8190
    max_buffer_headers = 8190 * 32


def chunked(body: bytes, chunk: int) -> bytes:
    """body in HTTP/1.1 chunked transfer coding, chunk bytes per chunk."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def request_stream(wire: bytes) -> LimitedStream:
    """request.stream as werkzeug makes it under gunicorn (wsgi.input_terminated, MAX_CONTENT_LENGTH 16 MB)."""
    return LimitedStream(Body(ChunkedReader(Request(), SocketUnreader(Socket(wire)))), 16 << 20, is_max=True)


def cpu_ms(read, wire: bytes, body: bytes, n: int) -> float:
    """Median CPU milliseconds of one thread reading wire to its end with read, over n reads."""
    times = []
    for _ in range(n):
        stream = request_stream(wire)
        started = time.thread_time()
        data = read(stream)
        times.append(time.thread_time() - started)
        assert data == body
    return statistics.median(times) * 1e3


def read_1mb_at_a_time(stream) -> bytes:
    return b"".join(iter(lambda: stream.read(1 << 20), b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=15, help="reads per figure (the median is shown)")
    args = parser.parse_args()
    return_large_blocks_to_the_os()  # the web process's malloc setting (allocations over 128 KB mapped)
    pattern = bytes(range(256))
    print(f"{'body':>8} {'chunks':>8} {'get_data (64 KB reads)':>24} {'1 MB reads':>26}")
    for size in (70_000, 300_000, 3_600_000):  # coffee.jpg's size, a mid-size photo, a phone's photo
        body = (pattern * (size // 256 + 1))[:size]
        for chunk in (16_384, 65_536, 1 << 20):
            wire = chunked(body, chunk)
            before = cpu_ms(lambda stream: stream.read(), wire, body, args.n)  # what get_data(cache=False) calls
            after = cpu_ms(read_1mb_at_a_time, wire, body, args.n)
            print(f"{size / 1e6:>6.2f}MB {chunk // 1024:>6}KB {before:>21.2f} ms {after:>23.2f} ms")


if __name__ == "__main__":
    main()
