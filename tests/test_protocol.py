"""The wire protocol: shared blocks identical in both scripts, every message
round-trips, each side handles exactly what the other sends, and the frame
decoder survives any byte string."""

import ast
import os
import random
import re
import socket
import time

import pytest

from conftest import POD, SERVER

SHARED = re.compile(r"# ---- BEGIN SHARED (\w+) .*?\n(.*?)# ---- END SHARED \1 ----", re.S)
# Names the shared blocks may use from outside themselves.
AGREED_NAMES = {"Rejected", "Unavailable", "Pipe2meError"}


def shared_blocks(path):
    with open(path, encoding="utf-8") as fh:
        return dict(SHARED.findall(fh.read()))


def test_protocol_shared_blocks_identical():
    server, pod = shared_blocks(SERVER), shared_blocks(POD)
    assert set(server) == {"protocol", "relay"}
    assert server == pod


def test_protocol_shared_blocks_use_only_agreed_names():
    blocks = shared_blocks(SERVER)
    tree = ast.parse(blocks["protocol"] + blocks["relay"])
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    stdlib = {"struct", "enum", "json", "selectors", "socket", "collections", "heapq",
              "time", "os", "ssl", "contextlib", "resource"}
    builtins = set(dir(__builtins__)) if isinstance(__builtins__, dict) is False else set(__builtins__)
    outside = used - defined - stdlib - builtins - {"self", "exc", "_"}
    outside = {n for n in outside if not _is_local(tree, n)}
    assert outside <= AGREED_NAMES, outside


def _is_local(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.arg == name:
            return True
        if isinstance(node, (ast.Name,)) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        if isinstance(node, ast.ExceptHandler) and node.name == name:
            return True
    return False


def test_protocol_every_message_round_trips(server_mod, pod_mod):
    for sender, receiver, sends in ((pod_mod, server_mod, pod_mod.POD_SENDS),
                                    (server_mod, pod_mod, server_mod.SERVER_SENDS)):
        decoder = receiver.FrameDecoder(sends)
        payloads, wire = {}, b""
        for msg in sorted(sends):
            payloads[msg.value] = os.urandom(msg.value * 3 + 1)
            wire += sender.encode_frame(msg, msg.value, payloads[msg.value])
        for size in (1, 7, len(wire)):  # any split of the byte stream decodes the same
            got = {}
            for start in range(0, len(wire), size):
                for m, stream, piece in decoder.frames(wire[start:start + size]):
                    got[(m.value, stream)] = got.get((m.value, stream), b"") + bytes(piece)
            assert got == {(v, v): p for v, p in payloads.items()}


def test_protocol_each_side_handles_what_the_other_sends(server_mod, pod_mod):
    assert server_mod.POD_SENDS == pod_mod.POD_SENDS
    assert server_mod.SERVER_SENDS == pod_mod.SERVER_SENDS
    # The pod's decoder accepts exactly what the server sends, and vice versa.
    for msg in server_mod.Msg:
        frame = server_mod.encode_frame(msg, 1, b"")
        for decoder_allowed, sent in ((server_mod.SERVER_SENDS, True), (server_mod.POD_SENDS, False)):
            decoder = server_mod.FrameDecoder(decoder_allowed)
            if msg in decoder_allowed:
                assert list(decoder.frames(frame + b"x" * 0)) or msg == server_mod.Msg.DATA
            else:
                with pytest.raises(server_mod.ProtocolError):
                    list(decoder.frames(frame))
    # Every type either side sends has a handler in the receiving code.
    handled = _handled_messages(POD, "PodMux") | _handled_messages(SERVER, "Mux")
    for msg in server_mod.SERVER_SENDS:
        assert msg.name in handled | {"WELCOME", "REJECT"}, msg
    for msg in server_mod.POD_SENDS:
        assert msg.name in _handled_messages(SERVER, "Mux") | _handled_messages(SERVER, "PodSession") | {"HELLO"}, msg


def _handled_messages(path, _cls):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return set(re.findall(r"Msg\.([A-Z]+)", text))


def test_protocol_decoder_randomized(server_mod):
    """Any bytes: frames, "need more", or ProtocolError; never another exception,
    never more buffered than one frame plus the last chunk."""
    rng = random.Random(1234)
    limit = server_mod.FRAME_HEADER.size + server_mod.MAX_FRAME_BYTES
    for round_ in range(3000):
        decoder = server_mod.FrameDecoder(server_mod.POD_SENDS)
        chunks = []
        for _ in range(rng.randrange(1, 6)):
            kind = rng.random()
            if kind < 0.4:
                msg = rng.choice(sorted(server_mod.POD_SENDS))
                chunk = server_mod.encode_frame(msg, rng.randrange(0, 2**32), os.urandom(rng.randrange(0, 64)))
                chunk = chunk[: rng.randrange(1, len(chunk) + 1)]
            elif kind < 0.7:
                chunk = os.urandom(rng.randrange(1, 40))
            else:
                chunk = server_mod.FRAME_HEADER.pack(rng.randrange(0, 256), 1, rng.randrange(0, 2**32))
            chunks.append(chunk)
        try:
            for chunk in chunks:
                for frame in decoder.frames(chunk):
                    assert frame[0] in server_mod.POD_SENDS
                assert len(decoder.buffer) <= limit
        except server_mod.ProtocolError:
            pass


def test_protocol_oversized_frame_refused(server_mod):
    decoder = server_mod.FrameDecoder(server_mod.POD_SENDS)
    header = server_mod.FRAME_HEADER.pack(server_mod.Msg.DATA, 1, server_mod.MAX_FRAME_BYTES + 1)
    with pytest.raises(server_mod.ProtocolError, match="exceeds"):
        list(decoder.frames(header))


class Pair:
    """Two Muxes connected by a socketpair, streams to local socketpairs."""

    def __init__(self, mod):
        self.mod = mod
        self.loop = mod.EventLoop()
        a, b = socket.socketpair()
        import logging
        log = logging.getLogger("test")
        self.server = mod.Mux(self.loop, a, mod.POD_SENDS, log)
        self.pod = mod.Mux(self.loop, b, mod.SERVER_SENDS, log)
        self.pod_locals = {}
        pair = self

        def on_open(stream_id, port):
            mine, theirs = socket.socketpair()
            pair.pod_locals[stream_id] = theirs
            pair.pod.add_stream(stream_id, mine)
        self.pod.on_open = on_open

    def run_until(self, condition, timeout=10):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            self._once()

    def _once(self):
        self.loop.call_later(0.01, lambda: None)
        self.loop.run_once()


def test_protocol_stream_half_close_both_ways(server_mod):
    pair = Pair(server_mod)
    consumer, server_side = socket.socketpair()
    pair.server.open_stream(server_side, 80)
    pair.run_until(lambda: 1 in pair.pod_locals)
    service = pair.pod_locals[1]
    service.setblocking(False)
    consumer.setblocking(False)
    consumer.sendall(b"request")
    consumer.shutdown(socket.SHUT_WR)
    got = bytearray()

    def service_got_eof():
        try:
            data = service.recv(65536)
        except BlockingIOError:
            return False
        if data:
            got.extend(data)
            return False
        return True
    pair.run_until(service_got_eof)
    assert bytes(got) == b"request"
    service.sendall(b"response" * 1000)
    service.shutdown(socket.SHUT_WR)
    back = bytearray()

    def consumer_got_eof():
        try:
            data = consumer.recv(65536)
        except BlockingIOError:
            return False
        if data:
            back.extend(data)
            return False
        return True
    pair.run_until(consumer_got_eof)
    assert bytes(back) == b"response" * 1000
    pair.run_until(lambda: not pair.server.streams and not pair.pod.streams)


def test_protocol_data_beyond_window_closes_connection(server_mod):
    pair = Pair(server_mod)
    consumer, server_side = socket.socketpair()
    pair.server.open_stream(server_side, 80)
    pair.run_until(lambda: 1 in pair.pod_locals)
    closed = []
    pair.pod.on_closed = closed.append
    chunk = b"x" * server_mod.MAX_FRAME_BYTES
    for _ in range(server_mod.STREAM_WINDOW_BYTES // len(chunk) + 1):
        pair.server.out += server_mod.encode_frame(server_mod.Msg.DATA, 1, chunk)
    pair.server.flush()
    pair.run_until(lambda: closed)
    assert "beyond the window" in closed[0]


def test_protocol_unknown_stream_closes_connection(server_mod):
    pair = Pair(server_mod)
    closed = []
    pair.pod.on_closed = closed.append
    pair.server.send(server_mod.Msg.DATA, 99, b"hello")
    pair.run_until(lambda: closed)
    assert "unknown stream" in closed[0]
