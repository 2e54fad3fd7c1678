#!/usr/bin/env python3
"""TCP relay that adds a fixed delay to each direction (a poor man's netem).

Usage: python3 bench/delay_relay.py --target HOST:PORT [--listen HOST:PORT]
                                    [--delay-ms 10]

Prints `listening <host>:<port>` on stdout once it accepts connections.
Every accepted connection is relayed to --target; each chunk read from one
side is written to the other side --delay-ms later, in order, so a path
through it gains 2 x delay of round-trip time. The relay terminates TCP on
both sides: what it emulates is a long fat pipe whose buffer holds
QUEUE_LIMIT_BYTES per direction, so a tunnel protocol that waits for
acknowledgements of its own (credit windows) meets the added latency, while
the kernel's TCP windows on either side stay local.

Backpressure: when a direction holds QUEUE_LIMIT_BYTES that are not yet
written, the relay stops reading from that direction's source. Half-close:
EOF travels with the same delay and becomes shutdown(SHUT_WR) on the other
side; a connection closes when both directions are done or either errors.

Python 3.8+, stdlib only; one thread, one selector, one timer queue.
"""
import argparse
import collections
import heapq
import itertools
import selectors
import signal
import socket
import sys
import time

CHUNK_BYTES = 256 * 1024
QUEUE_LIMIT_BYTES = 64 * 1024 * 1024
LISTEN_BACKLOG = 4096
EOF = None                      # queue marker for a half-close


# =====================================================================
# DIRECTIONS — one per (source, destination) pair; used by Connection
# =====================================================================

class Direction:
    """Bytes read from `src`, queued until due, then written to `dst`."""

    def __init__(self, conn, src, dst):
        self.conn = conn
        self.src = src
        self.dst = dst
        self.delayed = collections.deque()   # (due, data or EOF), not yet due
        self.ready = collections.deque()     # due, waiting for dst to take
        self.queued_bytes = 0
        self.read_open = True
        self.done = False

    def read(self, now, delay_s):
        """Read one chunk from src; schedule it. Returns False on error."""
        try:
            data = self.src.recv(CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            self.read_open = False
            self.delayed.append((now + delay_s, EOF))
        else:
            self.queued_bytes += len(data)
            self.delayed.append((now + delay_s, data))
        return True

    def wants_read(self):
        return self.read_open and self.queued_bytes < QUEUE_LIMIT_BYTES

    def release(self, now):
        """Move due items to the ready queue; return the next due time."""
        while self.delayed and self.delayed[0][0] <= now:
            data = self.delayed.popleft()[1]
            self.ready.append(EOF if data is EOF else memoryview(data))
        return self.delayed[0][0] if self.delayed else None

    def write(self):
        """Write what is ready without blocking. Returns False on error."""
        while self.ready:
            head = self.ready[0]
            if head is EOF:
                self.ready.popleft()
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    return False
                self.done = True
                return True
            try:
                sent = self.dst.send(head)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.queued_bytes -= sent
            if sent < len(head):
                self.ready[0] = head[sent:]
                return True
            self.ready.popleft()
        return True


# =====================================================================
# CONNECTIONS — a consumer socket, its target socket, two directions
# =====================================================================

class Connection:
    def __init__(self, relay, client, upstream):
        self.relay = relay
        self.socks = (client, upstream)
        self.forward = Direction(self, client, upstream)
        self.backward = Direction(self, upstream, client)
        self.events = {client: 0, upstream: 0}
        self.closed = False
        for sock in self.socks:
            relay.selector.register(sock, selectors.EVENT_READ, (self, sock))
            self.events[sock] = selectors.EVENT_READ

    def on_event(self, sock, events, now):
        ok = True
        if events & selectors.EVENT_WRITE:
            ok = self.outgoing_to(sock).write()
        if ok and events & selectors.EVENT_READ:
            direction = self.incoming_from(sock)
            if direction.wants_read():
                ok = direction.read(now, self.relay.delay_s)
                self.relay.schedule(direction)
        if not ok:
            self.close()
            return
        self.update()

    def incoming_from(self, sock):
        return self.forward if sock is self.socks[0] else self.backward

    def outgoing_to(self, sock):
        return self.forward if sock is self.socks[1] else self.backward

    def on_due(self, direction, now):
        next_due = direction.release(now)
        if next_due is not None:
            self.relay.schedule(direction, next_due)
        if not direction.write():
            self.close()
            return
        self.update()

    def update(self):
        if self.closed:
            return
        if self.forward.done and self.backward.done:
            self.close()
            return
        for sock in self.socks:
            src_dir, dst_dir = self.incoming_from(sock), self.outgoing_to(sock)
            events = 0
            if src_dir.wants_read():
                events |= selectors.EVENT_READ
            if dst_dir.ready:
                events |= selectors.EVENT_WRITE
            if events != self.events[sock]:
                self.set_events(sock, events)

    def set_events(self, sock, events):
        if self.events[sock] and events:
            self.relay.selector.modify(sock, events, (self, sock))
        elif events:
            self.relay.selector.register(sock, events, (self, sock))
        else:
            self.relay.selector.unregister(sock)
        self.events[sock] = events

    def close(self):
        """Idempotent: unregister and close both sockets."""
        if self.closed:
            return
        self.closed = True
        for sock in self.socks:
            if self.events[sock]:
                self.relay.selector.unregister(sock)
            sock.close()


# =====================================================================
# RELAY — listener, timer queue and the loop
# =====================================================================

class Stop(Exception):
    """Raised by the signal handler to leave the loop."""


class Relay:
    def __init__(self, listener, target, delay_s):
        self.listener = listener
        self.target = target
        self.delay_s = delay_s
        self.selector = selectors.DefaultSelector()
        self.timers = []                 # heap of (due, seq, direction)
        self.seq = itertools.count()
        self.scheduled = set()           # directions with a timer pending
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)

    def schedule(self, direction, due=None):
        if id(direction) in self.scheduled:
            return
        if due is None:
            if not direction.delayed:
                return
            due = direction.delayed[0][0]
        self.scheduled.add(id(direction))
        heapq.heappush(self.timers, (due, next(self.seq), direction))

    def accept(self):
        for _ in range(LISTEN_BACKLOG):
            try:
                client, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError as exc:
                print("delay_relay: connect to %s:%d failed: %s"
                      % (self.target + (exc,)), file=sys.stderr)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Connection(self, client, upstream)

    def run_timers(self, now):
        while self.timers and self.timers[0][0] <= now:
            _due, _seq, direction = heapq.heappop(self.timers)
            self.scheduled.discard(id(direction))
            if not direction.conn.closed:
                direction.conn.on_due(direction, now)

    def serve(self):
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, events in self.selector.select(timeout):
                if key.data is None:
                    self.accept()
                    continue
                conn, sock = key.data
                if not conn.closed:
                    conn.on_event(sock, events, time.monotonic())
            self.run_timers(time.monotonic())


def parse_hostport(text):
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    args = parser.parse_args(argv)

    def on_signal(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(parse_hostport(args.listen))
    listener.listen(LISTEN_BACKLOG)
    relay = Relay(listener, parse_hostport(args.target), args.delay_ms / 1000)
    print("listening %s:%d" % listener.getsockname()[:2], flush=True)
    try:
        relay.serve()
    except Stop:
        pass
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
