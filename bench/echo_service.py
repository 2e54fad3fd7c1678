#!/usr/bin/env python3
"""Echo, sink and source service the benchmark puts behind every path.

Usage: python3 bench/echo_service.py [--host 127.0.0.1] [--port 0]

Prints `listening <host>:<port>` on stdout once it accepts connections, then
serves until SIGTERM or SIGINT. One thread, one selector: it must never be
the bottleneck, so every read goes into one shared 256 KiB buffer and every
write comes from one shared block of random bytes (nothing per connection is
allocated beyond what a slow reader leaves behind).

Wire contract (the first byte of a stream picks its mode):
- `E`: echo. Every byte the stream sends, the `E` included, comes back.
- `T` + up (8 bytes, big-endian) + down (8 bytes, big-endian): transfer.
  The service reads and discards `up` bytes while it sends `down` bytes;
  when both are done it sends one byte `K`. So a client that sends `up`
  bytes and reads `down + 1` bytes knows every byte reached the service.
Anything else closes the stream. Half-close: after an echo stream's EOF the
service finishes sending what it owes, then shuts its write side.

Python 3.8+, stdlib only.
"""
import argparse
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time

BUFFER_BYTES = 256 * 1024
LISTEN_BACKLOG = 4096
TRANSFER_HEADER = struct.Struct("!QQ")
MODE_ECHO = b"E"
MODE_TRANSFER = b"T"
DONE_BYTE = b"K"
SOURCE_BLOCK = memoryview(os.urandom(BUFFER_BYTES))


# =====================================================================
# STREAMS — one object per accepted connection; used by the loop below
# =====================================================================

class Stream:
    """State of one connection. `on_readable`/`on_writable` never block."""

    def __init__(self, sock, selector, shared_buffer):
        self.sock = sock
        self.selector = selector
        self.buffer = shared_buffer
        self.mode = None
        self.header = b""
        self.up_left = 0
        self.down_left = 0
        self.pending = b""          # echo bytes the peer has not taken yet
        self.read_done = False
        self.done_sent = False
        self.closed = False
        self.events = selectors.EVENT_READ
        selector.register(sock, self.events, self)

    def on_readable(self):
        try:
            n = self.sock.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if n == 0:
            self.read_done = True
            self.after_eof()
            return
        data = memoryview(self.buffer)[:n]
        if self.mode is None:
            data = self.take_mode(data)
            if data is None:
                return
        if self.mode == MODE_ECHO:
            self.echo(data)
        else:
            self.sink(len(data))
        self.update_events()

    def take_mode(self, data):
        """Consume the mode byte and any header; return what is left or None."""
        if self.mode is None and not self.header:
            first = bytes(data[:1])
            if first == MODE_ECHO:
                self.mode = MODE_ECHO
                return data
            if first != MODE_TRANSFER:
                self.close()
                return None
        need = 1 + TRANSFER_HEADER.size - len(self.header)
        self.header += bytes(data[:need])
        data = data[need:]
        if len(self.header) < 1 + TRANSFER_HEADER.size:
            return None
        self.mode = MODE_TRANSFER
        self.up_left, self.down_left = TRANSFER_HEADER.unpack(self.header[1:])
        return data

    def echo(self, data):
        if self.pending:
            self.pending += bytes(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.pending = bytes(data[sent:])

    def sink(self, n):
        self.up_left = max(0, self.up_left - n)

    def after_eof(self):
        if self.mode == MODE_ECHO and not self.pending:
            self.shutdown_write()
            self.close()
        elif self.mode == MODE_TRANSFER and (self.up_left or self.down_left):
            self.close()      # the client gave up before the transfer ended
        else:
            self.update_events()
            if not self.events:
                self.close()

    def on_writable(self):
        try:
            if self.mode == MODE_ECHO:
                self.write_echo()
            else:
                self.write_transfer()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        if not self.closed:
            self.update_events()

    def write_echo(self):
        sent = self.sock.send(self.pending)
        self.pending = self.pending[sent:]
        if not self.pending and self.read_done:
            self.shutdown_write()
            self.close()

    def write_transfer(self):
        if self.down_left:
            chunk = SOURCE_BLOCK[:min(self.down_left, BUFFER_BYTES)]
            self.down_left -= self.sock.send(chunk)
        elif not self.up_left and not self.done_sent:
            if self.sock.send(DONE_BYTE) == 1:
                self.done_sent = True
                if self.read_done:
                    self.shutdown_write()
                    self.close()

    def update_events(self):
        if self.closed:
            return
        events = 0
        if not self.read_done and not self.pending:
            events |= selectors.EVENT_READ
        if self.pending or (self.mode == MODE_TRANSFER and (
                self.down_left or (not self.up_left and not self.done_sent))):
            events |= selectors.EVENT_WRITE
        if events == self.events:
            return
        self.events = events
        if events:
            self.selector.modify(self.sock, events, self)
        else:
            self.selector.unregister(self.sock)

    def shutdown_write(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        """Idempotent: unregister and close; safe after any error."""
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.selector.unregister(self.sock)
            self.events = 0
        self.sock.close()


# =====================================================================
# LOOP — accepts and dispatches; owns the listening socket
# =====================================================================

class Stop(Exception):
    """Raised by the signal handler to leave the loop."""


def accept_all(listener, selector, shared_buffer):
    for _ in range(LISTEN_BACKLOG):
        try:
            sock, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                print("echo_service: out of file descriptors", file=sys.stderr)
                return
            raise
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Stream(sock, selector, shared_buffer)


def serve(listener):
    selector = selectors.DefaultSelector()
    shared_buffer = bytearray(BUFFER_BYTES)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, events in selector.select():
            if key.data is None:
                accept_all(listener, selector, shared_buffer)
                continue
            stream = key.data
            if events & selectors.EVENT_WRITE and not stream.closed:
                stream.on_writable()
            if events & selectors.EVENT_READ and not stream.closed:
                stream.on_readable()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    def on_signal(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(LISTEN_BACKLOG)
    host, port = listener.getsockname()[:2]
    print("listening %s:%d" % (host, port), flush=True)
    started = time.monotonic()
    try:
        serve(listener)
    except Stop:
        pass
    listener.close()
    print("echo_service: stopped after %.0f s" % (time.monotonic() - started),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
