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
# Names the shared blocks may use from outside themselves (none: SHARED base
# holds the error tree the others raise).
AGREED_NAMES = set()


def shared_blocks(path):
    with open(path, encoding="utf-8") as fh:
        return dict(SHARED.findall(fh.read()))


def test_protocol_shared_blocks_identical():
    server, pod = shared_blocks(SERVER), shared_blocks(POD)
    assert set(server) == {"base", "protocol", "relay", "process"}
    assert server == pod


def test_protocol_shared_blocks_use_only_agreed_names():
    blocks = shared_blocks(SERVER)
    tree = ast.parse("".join(blocks.values()))
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    stdlib = {"struct", "enum", "json", "selectors", "socket", "collections", "heapq",
              "time", "os", "ssl", "contextlib", "resource", "sys", "marshal", "mmap",
              "traceback", "re", "subprocess", "fcntl", "threading", "http", "urllib"}
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
    # Every type either side sends is branched on in the receiving code.
    for msg in server_mod.SERVER_SENDS:
        assert msg.name in _handled_messages(POD), msg
    for msg in server_mod.POD_SENDS:
        assert msg.name in _handled_messages(SERVER), msg


def _handled_messages(path):
    """Message names the code branches on: `msg == Msg.X`, `msg in (Msg.X, ...)`
    or `Msg.X: handler` in a table. Sending or listing a message does not count."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    branched = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            branched += [node.left] + node.comparators
        elif isinstance(node, ast.Dict):
            branched += [key for key in node.keys if key is not None]
    return {sub.attr for operand in branched for sub in ast.walk(operand)
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
            and sub.value.id == "Msg"}


def random_frame(mod, allowed, rng):
    """One frame of an allowed type; payload sizes from empty to MAX_FRAME_BYTES."""
    msg = rng.choice(sorted(allowed))
    size = rng.choice([0, 1, 4, rng.randrange(0, 3000), rng.randrange(0, mod.MAX_FRAME_BYTES + 1),
                       mod.MAX_FRAME_BYTES])
    return msg, rng.randrange(0, 2**32), rng.randbytes(size)


def random_piece(mod, allowed, rng):
    """Bytes of one kind: a valid frame, a cut-off one, junk, a header with any
    type and length (oversized ones included), a frame of a forbidden type."""
    kind = rng.randrange(5)
    if kind == 0:
        return mod.encode_frame(*random_frame(mod, allowed, rng))
    if kind == 1:
        frame = mod.encode_frame(*random_frame(mod, allowed, rng))
        return frame[:rng.randrange(1, len(frame) + 1)]
    if kind == 2:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 3:
        length = rng.choice([rng.randrange(0, 2**32), mod.MAX_FRAME_BYTES + 1, 2**32 - 1])
        return mod.FRAME_HEADER.pack(rng.randrange(0, 256), rng.randrange(0, 2**32), length)
    forbidden = [m for m in range(256) if m not in allowed]
    return mod.encode_frame(rng.choice(forbidden), 1, rng.randbytes(rng.randrange(0, 16)))


def random_cuts(data, rng):
    """data in chunks of random sizes, single bytes included."""
    pos = 0
    while pos < len(data):
        size = rng.choice([1, rng.randrange(1, 20), rng.randrange(1, 70000), len(data)])
        yield data[pos:pos + size]
        pos += size


def feed(mod, decoder, chunks):
    """Feed chunks; check every frame and the buffer bound on the way. Returns
    the frames with DATA pieces joined, as [msg, stream, payload]."""
    bound = mod.FRAME_HEADER.size + mod.MAX_FRAME_BYTES
    frames, fed, passed = [], 0, 0
    for chunk in chunks:
        fed += len(chunk)
        for msg, stream, payload in decoder.frames(chunk):
            assert msg in decoder.allowed and isinstance(msg, mod.Msg)
            assert 0 <= stream < 2**32 and len(payload) <= mod.MAX_FRAME_BYTES
            assert isinstance(payload, bytes) or msg == mod.Msg.DATA  # DATA: views, cut-through
            passed += len(payload)
            if msg == mod.Msg.DATA and frames and frames[-1][3]:
                frames[-1][2] += bytes(payload)     # the next piece of the same DATA frame
            else:
                frames.append([msg, stream, bytes(payload), msg == mod.Msg.DATA])
            if frames[-1][3] and decoder.data_left == 0:
                frames[-1][3] = False
        assert len(decoder.buffer) <= bound       # at most one header + one control frame
        assert passed <= fed                      # nothing is invented
    return [tuple(f[:3]) for f in frames]


@pytest.mark.parametrize("side", ["server", "pod"])
def test_protocol_decoder_randomized(server_mod, pod_mod, side):
    """Any byte string, cut anywhere: frames, "need more", or ProtocolError;
    never another exception, never more buffered than one header plus one
    control frame; valid input comes out exactly as it went in."""
    mod = server_mod if side == "server" else pod_mod
    allowed = mod.POD_SENDS if side == "server" else mod.SERVER_SENDS
    rng = random.Random(1234 if side == "server" else 4321)
    outcomes = {"frames": 0, "need more": 0, "ProtocolError": 0}
    for round_ in range(1500):
        decoder = mod.FrameDecoder(allowed)
        if round_ % 3 == 0:  # only valid frames: exact round trip under any cuts
            sent = [random_frame(mod, allowed, rng) for _ in range(rng.randrange(1, 5))]
            wire = b"".join(mod.encode_frame(*f) for f in sent)
            assert feed(mod, decoder, random_cuts(wire, rng)) == sent
            outcomes["frames"] += 1
            continue
        wire = b"".join(random_piece(mod, allowed, rng) for _ in range(rng.randrange(1, 6)))
        try:
            got = feed(mod, decoder, random_cuts(wire, rng))
        except mod.ProtocolError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["ProtocolError"] += 1
            continue
        outcomes["frames" if got else "need more"] += 1
    assert all(outcomes.values()), outcomes  # every outcome was exercised


def test_protocol_decoder_never_keeps_data(server_mod):
    """40 MiB of DATA in random cuts passes through with nothing buffered
    beyond a frame header: the decoder itself never grows with the input."""
    mod, rng = server_mod, random.Random(99)
    decoder = mod.FrameDecoder(mod.POD_SENDS)
    frame = mod.encode_frame(mod.Msg.DATA, 3, b"d" * mod.MAX_FRAME_BYTES)
    passed, wire = 0, frame * 160
    for chunk in random_cuts(wire, rng):
        for msg, stream, payload in decoder.frames(chunk):
            assert (msg, stream) == (mod.Msg.DATA, 3)
            passed += len(payload)
        assert len(decoder.buffer) < mod.FRAME_HEADER.size
    assert passed == 160 * mod.MAX_FRAME_BYTES


def test_protocol_greeting_reader_randomized(server_mod):
    """read_frame_blocking (the HELLO reader) on any bytes followed by EOF:
    one allowed frame, or ProtocolError; never another exception."""
    mod, rng = server_mod, random.Random(7)
    for _ in range(300):
        wire = b"".join(random_piece(mod, mod.POD_SENDS, rng) for _ in range(rng.randrange(1, 3)))
        wire = wire[:200000]
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.settimeout(5)
            theirs.setblocking(False)
            try:
                theirs.send(wire)
            except BlockingIOError:
                pass
            theirs.shutdown(socket.SHUT_WR)
            try:
                msg, stream, payload = mod.read_frame_blocking(
                    ours, mod.POD_SENDS, time.monotonic() + 5)
            except mod.ProtocolError:
                continue
            assert msg in mod.POD_SENDS and len(payload) <= mod.MAX_FRAME_BYTES


def test_protocol_oversized_frame_refused(server_mod):
    decoder = server_mod.FrameDecoder(server_mod.POD_SENDS)
    header = server_mod.FRAME_HEADER.pack(server_mod.Msg.DATA, 1, server_mod.MAX_FRAME_BYTES + 1)
    with pytest.raises(server_mod.ProtocolError, match="exceeds"):
        list(decoder.frames(header))


@pytest.mark.parametrize("side", ["server", "pod"])
def test_protocol_loop_drops_events_of_a_socket_closed_earlier_in_the_batch(server_mod, pod_mod, side):
    """Two sockets ready in one select(): whichever callback runs first closes
    the other (as a stream's abort does when DATA meets a refused connect).
    The closed socket's callback must not run on its dead descriptor."""
    mod = server_mod if side == "server" else pod_mod
    loop = mod.EventLoop()
    pairs = [socket.socketpair() for _ in range(2)]
    called = []

    def callback_of(mine, other):
        def on_event(mask):
            called.append(mine)
            loop.watch(other, 0)
            other.close()
            mine.recv(1)
        return on_event
    a, b = pairs[0][0], pairs[1][0]
    loop.watch(a, mod.EVENT_READ, callback_of(a, b))
    loop.watch(b, mod.EVENT_READ, callback_of(b, a))
    for _near, far in pairs:
        far.send(b"x")
    loop.call_later(0, lambda: None)
    loop.run_once()
    assert len(called) == 1
    for near, far in pairs:
        near.close()
        far.close()


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

        def on_open(stream_id, port, *_ends):
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
    server_mod.PodSession.open_stream(pair.server, server_side, 80)  # the server's opener on a bare Mux
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
    server_mod.PodSession.open_stream(pair.server, server_side, 80)  # the server's opener on a bare Mux
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


# ---- who handles and who sends each message, read from the code itself ----------------------

RECEIVERS = {  # functions through which frames from the peer pass, per side
    SERVER: ("Mux.dispatch", "Mux.on_frame_0", "PodSession.on_control", "PodGate.greet"),
    POD: ("Mux.dispatch", "Mux.on_frame_0", "PodMux.on_control", "PodRunner.read_answer"),
}
SENDING_CALLS = {"send", "queue", "send_control", "encode_frame", "encode_control", "pack_into"}


def _functions(path):
    """{"Class.method" or "function": (ast node, inside a shared block?)}."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    shared_lines = set()
    for match in SHARED.finditer(text):
        first = text.count("\n", 0, match.start()) + 1
        shared_lines.update(range(first, first + match.group(0).count("\n") + 1))
    result = {}
    for node in ast.parse(text).body:
        children = node.body if isinstance(node, ast.ClassDef) else [node]
        for child in children:
            if isinstance(child, ast.FunctionDef):
                name = "%s.%s" % (node.name, child.name) if child is not node else child.name
                result[name] = (child, child.lineno in shared_lines)
    return result


def _msg_names(nodes):
    return {n.attr for node in nodes for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "Msg"}


def _compared(function):
    """Msg members a function compares a frame type against."""
    return _msg_names([n for n in ast.walk(function) if isinstance(n, ast.Compare)])


def _sent(function):
    """Msg members a function passes to a call that builds or sends a frame."""
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", getattr(n.func, "id", None)) in SENDING_CALLS]
    return _msg_names([arg for call in calls for arg in call.args])


def test_protocol_each_side_handles_exactly_what_the_other_sends_by_code(server_mod):
    pod_sends = {m.name for m in server_mod.POD_SENDS}
    server_sends = {m.name for m in server_mod.SERVER_SENDS}
    for path, peer_sends, own_sends in ((SERVER, pod_sends, server_sends),
                                         (POD, server_sends, pod_sends)):
        functions = _functions(path)
        handled = set().union(*(_compared(functions[name][0]) for name in RECEIVERS[path]))
        missing = peer_sends - handled
        assert not missing, "%s never looks at %s" % (os.path.basename(path), sorted(missing))
        # What this side's own code (outside the shared blocks) sends is in its list,
        # and everything in its list is sent somewhere (own code or shared relay).
        own = set().union(*(_sent(node) for node, shared in functions.values() if not shared))
        assert own <= own_sends, "%s sends %s" % (os.path.basename(path), sorted(own - own_sends))
        shared = set().union(*(_sent(node) for node, shared in functions.values() if shared))
        assert own_sends <= own | shared, sorted(own_sends - own - shared)
    # The decoders are built with the peer's list, so anything else is a protocol error.
    for path, cls, wanted in ((SERVER, "PodSession", "POD_SENDS"), (POD, "PodMux", "SERVER_SENDS")):
        init = _functions(path)["%s.__init__" % cls][0]
        names = {n.id for n in ast.walk(init) if isinstance(n, ast.Name)}
        assert wanted in names and ({"POD_SENDS", "SERVER_SENDS"} - {wanted}).isdisjoint(names)
