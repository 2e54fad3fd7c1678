"""Load generators: the consumer side of every measurement.

Each function connects to 127.0.0.1:`port` (a path's public port), speaks
the echo_service wire contract (see echo_service.py) and returns raw
figures; statistics and tables are report.py's job. Large buffers
(256 KiB, `recv_into` a shared buffer) keep the generator off the critical
path; many streams are driven by one selector, never by a thread each.
Every loop is bounded by a deadline and raises LoadError when it passes.

Python 3.8+, stdlib only. Importing this module has no side effects.
"""
import errno
import os
import selectors
import socket
import struct
import threading
import time

BUFFER_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 30.0
TRANSFER_HEADER = struct.Struct("!QQ")
SOURCE_BLOCK = memoryview(os.urandom(BUFFER_BYTES))


class LoadError(Exception):
    """A measurement failed (refused, reset, short read, deadline)."""


# =====================================================================
# SINGLE STREAM — throughput, round trip, setup
# =====================================================================

def _connect(port, host="127.0.0.1"):
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Kernel timeouts instead of settimeout(): CPython polls before every
    # call on a socket with a timeout, one extra system call per chunk.
    sock.settimeout(None)
    timeval = struct.pack("ll", int(IO_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def _send_bytes(sock, count, deadline):
    while count > 0:
        if time.monotonic() > deadline:
            raise LoadError("sending did not finish before the deadline")
        chunk = SOURCE_BLOCK[:min(count, BUFFER_BYTES)]
        sock.sendall(chunk)
        count -= len(chunk)


def _recv_bytes(sock, count, deadline, buffer):
    """Read exactly `count` bytes; return the last byte read."""
    view = memoryview(buffer)
    last = b""
    while count > 0:
        if time.monotonic() > deadline:
            raise LoadError("receiving did not finish before the deadline")
        n = sock.recv_into(view[:min(count, len(view))])
        if n == 0:
            raise LoadError("stream closed with %d bytes still expected" % count)
        count -= n
        last = bytes(view[n - 1:n])
    return last


def transfer(port, up, down, timeout_s):
    """Send `up` bytes and receive `down` at once; return elapsed seconds."""
    buffer = bytearray(BUFFER_BYTES)
    deadline = time.monotonic() + timeout_s
    with _connect(port) as sock:
        started = time.perf_counter()
        sock.sendall(b"T" + TRANSFER_HEADER.pack(up, down))
        errors = []
        sender = None
        if up and down:
            sender = threading.Thread(target=_send_catching,
                                      args=(sock, up, deadline, errors), daemon=True)
            sender.start()
        elif up:
            _send_bytes(sock, up, deadline)
        last = _recv_bytes(sock, down + 1, deadline, buffer)
        elapsed = time.perf_counter() - started
        if sender is not None:
            sender.join(max(0.0, deadline - time.monotonic()))
        if errors:
            raise LoadError("sending failed: %s" % errors[0])
        if last != b"K":
            raise LoadError("transfer ended with %r instead of the done byte" % last)
    return elapsed


def _send_catching(sock, count, deadline, errors):
    try:
        _send_bytes(sock, count, deadline)
    except (OSError, LoadError) as exc:
        errors.append(exc)


def round_trips(port, count, size=64, warmup=20):
    """Ping-pong `size`-byte messages on one open stream; ns per round trip."""
    message = bytes(SOURCE_BLOCK[:size])
    buffer = bytearray(size)
    samples = []
    with _connect(port) as sock:
        deadline = time.monotonic() + IO_TIMEOUT_S + count * 0.1
        sock.sendall(b"E")
        _recv_bytes(sock, 1, deadline, buffer)
        for i in range(count + warmup):
            started = time.perf_counter_ns()
            sock.sendall(message)
            _recv_bytes(sock, size, deadline, buffer)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - started)
    return samples


def stream_setups(port, count, spacing_s=0.0):
    """Connect, send one byte, read its echo, close; ns from connect to echo."""
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"E")
            if sock.recv(1) != b"E":
                raise LoadError("stream closed before its first byte was echoed")
            samples.append(time.perf_counter_ns() - started)
        if spacing_s:
            time.sleep(spacing_s)
    return samples


# =====================================================================
# MANY STREAMS — parallel throughput and concurrency, one selector
# =====================================================================

def parallel_download(port, streams, total, timeout_s):
    """`streams` streams share `total` bytes down; return elapsed seconds."""
    share = total // streams
    buffer = bytearray(BUFFER_BYTES)
    selector = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(streams):
            sock = _connect(port)
            socks.append(sock)
        started = time.perf_counter()
        for sock in socks:
            sock.sendall(b"T" + TRANSFER_HEADER.pack(0, share))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, [share + 1])
        _drain(selector, buffer, time.monotonic() + timeout_s)
        return time.perf_counter() - started
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def _drain(selector, buffer, deadline):
    """Read every registered stream to its count; fail on a stall."""
    pending = len(selector.get_map())
    last_progress = time.monotonic()
    while pending:
        now = time.monotonic()
        if now > deadline or now - last_progress > IO_TIMEOUT_S:
            left = sorted(key.data[0] for key in selector.get_map().values())
            raise LoadError("%d of the streams stalled (bytes still expected: %s)"
                            % (pending, left))
        for key, _events in selector.select(1.0):
            try:
                n = key.fileobj.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                continue
            if n == 0:
                raise LoadError("a stream closed with %d bytes still expected"
                                % key.data[0])
            last_progress = time.monotonic()
            key.data[0] -= n
            if key.data[0] <= 0:
                selector.unregister(key.fileobj)
                pending -= 1


class Burst:
    """Open `count` streams at once; each sends a message and awaits its echo.

    Successful streams stay open until close(), so the caller can measure
    the relay while they idle. Use as a context manager.
    """
    MESSAGE = b"E" + b"concurrent-echo!"

    def __init__(self, port, count, timeout_s):
        self.port = port
        self.count = count
        self.timeout_s = timeout_s
        self.open = []
        self.ok = 0
        self.failed = 0
        self.seconds = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self):
        selector = selectors.DefaultSelector()
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        try:
            for _ in range(self.count):
                self._start_one(selector)
            self._pump(selector, deadline)
            self.failed += len(selector.get_map())
            for key in list(selector.get_map().values()):
                key.fileobj.close()
        finally:
            selector.close()
        self.seconds = time.perf_counter() - started
        return self

    def _start_one(self, selector):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            rc = sock.connect_ex(("127.0.0.1", self.port))
        except OSError:
            rc = -1
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            return
        selector.register(sock, selectors.EVENT_WRITE, [b""])

    def _pump(self, selector, deadline):
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for key, events in selector.select(min(left, 1.0)):
                self._on_event(selector, key, events)

    def _on_event(self, selector, key, events):
        sock = key.fileobj
        try:
            if events & selectors.EVENT_WRITE:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                sock.send(self.MESSAGE)   # 17 bytes fit any empty send buffer
                selector.modify(sock, selectors.EVENT_READ, key.data)
                return
            chunk = sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            selector.unregister(sock)
            sock.close()
            self.failed += 1
            return
        key.data[0] += chunk
        if len(key.data[0]) >= len(self.MESSAGE):
            selector.unregister(sock)
            self.ok += 1
            self.open.append(sock)

    def close(self):
        """Close every stream still open; idempotent."""
        while self.open:
            self.open.pop().close()
