"""Safe on the open internet (issue 11 points 1, 2, 4, 5 and 7), tried as an
attacker would: against a real server process on loopback, with a pod that
holds a valid certificate and misbehaves (raw frames from this process), with
crowds of consumers that never read, with floods of silent connections from
one source address (127.0.0.x addresses stand for other hosts).

Each test checks the promise, not the probe: the server stays up, memory
stays within its budgets and comes back, one source gets only its share, the
others are served (bench/attacks.py times it), logs and metrics leak nothing."""

import http.client
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import types

import pytest

from conftest import (POD, MiB, LocalService, Proc, ServerHandle, clean_env, connect, echo_handler,
                      echo_round_trip, free_port, setup_pod, start_pod, wait_until, write_tokens)
from helpers import RawPod

DOMAIN = "pipe2.localhost"
TOKEN = "safety-main-token"
TINY_TOKEN = "safety-tiny-token"
FLOOD_SOURCE = "127.0.0.8"      # the attacker's address
SERVED_S = 5.0                  # "served, not refused" on a loaded machine; bench/attacks.py
                                # measures the time (the target is 1 s)
OTHER_SOURCE = "127.0.0.9"      # a second attacker, or a stranger


# ---- a server, pods and raw pods ------------------------------------------------------

class Server(ServerHandle):
    """A server with known tokens and the given flags, reading nothing of this machine."""

    def __init__(self, workdir, extra=(), tokens=(), settings=None):
        state_dir = write_tokens(os.path.join(workdir, "state"),
                                 ["%s = max_ports:4 lifespan:1h" % TOKEN] + list(tokens))
        # a 5 s heartbeat: on a loaded machine a 1 s one declares busy pods dead
        env = clean_env(os.path.join(workdir, "home"))
        env.update(os.environ.get("SAFETY_ENV") and dict([os.environ["SAFETY_ENV"].split("=")]) or {})
        env.update(settings or {})
        super().__init__(workdir, extra=["--heartbeat-interval", "5"] + list(extra),
                         env=env,
                         state_dir=state_dir)
        self.token = TOKEN

    def log_after(self, mark):
        return self.proc.stderr()[mark:]

    def rss(self):
        return rss_bytes(self.proc.pid)

    def assert_alive(self):
        assert self.proc.alive(), self.proc.stderr()[-3000:]
        assert api(self, "GET", "/config")[0] == 200


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as fh:
        return int(re.search(r"VmRSS:\s+(\d+) kB", fh.read()).group(1)) * 1024


def api(server, method, path, body=None, source=None, headers=None, timeout=10.0):
    """(status, bytes) of one API request through the HTTP front."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    data = json.dumps(body).encode() if body is not None else None
    try:
        conn.request(method, path, body=data, headers=dict({"Host": DOMAIN}, **(headers or {})))
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def metric(text, name):
    found = re.search(rb"^%s (\d+)$" % re.escape(name.encode()), text, re.M)
    return int(found.group(1)) if found else None


def wait_for_metric(server, name, at_least, timeout=20.0):
    """The value of /metrics `name` once it is at least `at_least` (fails after `timeout`)."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = metric(api(server, "GET", "/metrics")[1], name)
        if value is not None and value >= at_least:
            return value
        time.sleep(0.05)
    raise AssertionError("%s stayed at %s, below %d" % (name, value, at_least))


class Identity:
    """A pod directory set up against the server: tunnel id, ports, cert."""

    def __init__(self, server, pod_dir, protocols="tcp", local_ports=None, token=TOKEN):
        local_ports = local_ports or [free_port() for _ in protocols.split(",")]
        self.fqdn = setup_pod(server, pod_dir, protocols, local_ports, token=token)
        self.dir = pod_dir
        values = dict(re.findall(r"^(\w+)='?([^'\n]*)'?$", open(
            os.path.join(pod_dir, "pipe2me.info.inc"), encoding="utf-8").read(), re.M))
        self.id = values["PIPE2ME_ID"]
        self.ports = [int(values["PIPE2ME_URLS_%d" % i].rsplit(":", 1)[1])
                      for i in range(len(local_ports))]
        self.cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
        self.key = os.path.join(pod_dir, "pipe2me.openssl.priv")
        self.cacert = os.path.join(pod_dir, "pipe2me.cacert")


def welcomed_pod(mod, server, identity, source=None, rcvbuf=None):
    """A hand-made pod connection with the tunnel's real certificate, past WELCOME."""
    pod = RawPod(mod, server.tunnel, identity.cacert, identity.cert, identity.key,
                 source=source, rcvbuf=rcvbuf)
    event = pod.hello(identity.id)
    assert event is not None and event[0] == mod.Msg.WELCOME, event
    return pod


class Bed:
    """A server with one live pod (echo service) whose tunnel must stay
    unaffected, and a tunnel whose certificate the raw pods use."""

    def __init__(self, server, workdir):
        self.server, self.workdir = server, workdir
        self.echo = LocalService(echo_handler)
        self.live = Identity(server, os.path.join(workdir, "live"), "tcp", [self.echo.port])
        self.raw = Identity(server, os.path.join(workdir, "raw"), "tcp")
        self.pod = start_pod(workdir, self.live.dir, name="live-pod")

    def assert_live_tunnel_served(self):
        payload = os.urandom(100000)
        assert echo_round_trip(self.live.ports[0], payload, timeout=10) == payload
        assert self.server.proc.stderr().count("pod connected tunnel=%s " % self.live.id) == 1

    def stop(self):
        assert self.pod.stop() == 0
        self.echo.stop()
        assert self.server.stop() == 0


@pytest.fixture
def bed(workdir):
    server = Server(workdir)
    b = Bed(server, workdir)
    yield b
    b.stop()


# =====================================================================================
# 7. One bad connection never ends the server
# =====================================================================================

DEEP_JSON = {  # control payloads of valid JSON syntax, too deep for the decoder
    "arrays": b"[" * 130000 + b"]" * 130000,
    "objects": b'{"reason":' * 23000 + b'"x"' + b"}" * 23000,
}


@pytest.mark.parametrize("shape", sorted(DEEP_JSON))
def test_safety_control_frame_that_breaks_the_decoder_closes_only_that_pod(
        bed, server_mod, shape):
    """A frame that makes a callback raise something nobody handled (here the
    JSON decoder's RecursionError) closes that pod's connection, is logged on
    one line and counted; the server and the other tunnel go on."""
    mark = bed.server.mark()
    for attempt in range(3):   # three times: the containment holds, not only once
        pod = welcomed_pod(server_mod, bed.server, bed.raw)
        assert pod.send(server_mod.encode_frame(server_mod.Msg.GOAWAY, 0, DEEP_JSON[shape]))
        assert pod.closed_within(5.0), "the server kept the connection open"
        pod.close()
        bed.server.assert_alive()
    bed.assert_live_tunnel_served()
    log = bed.server.log_after(mark)
    assert len(re.findall(r"WARNING .*internal error contained", log)) == 3, log[-2000:]
    assert "Traceback" not in log
    text = api(bed.server, "GET", "/metrics")[1]
    assert metric(text, "pipe2me_internal_errors_total") == 3, text


def test_safety_metrics_and_status_read_sessions_on_the_loop_thread(server_mod, tmp_path):
    """/metrics and the status page take what they show of the sessions on
    the loop thread, which owns them: while the loop is busy they wait, and
    they show the sessions as the loop left them. (Read from an API thread,
    a loop adding or removing a session mid-read raised "dictionary changed
    size during iteration"; churn from outside showed it once in 20 s with
    150 tunnels, so the property is checked here instead, in the process.)"""
    server = server_mod.Server(server_mod.load_settings(
        flags={"STATE_DIR": str(tmp_path / "state")}, environ={}))
    looping = threading.Thread(target=server.loop.run, daemon=True)
    looping.start()
    held, release, answers = threading.Event(), threading.Event(), {}

    def busy():  # on the loop thread: the sessions change while API threads ask
        held.set()
        release.wait(10)
        for n in range(3):  # a stand-in for PodSession: what the counts read of one
            server.hub.sessions["tunnel-%d" % n] = types.SimpleNamespace(
                streams={1: None, 2: None}, unsaved_traffic=lambda: (7, 5))

    def read(name, page):
        answers[name] = page()
    try:
        server.loop.call_soon_threadsafe(busy)
        assert held.wait(10)
        readers = [threading.Thread(target=read, args=item, daemon=True) for item in (
            ("status", server.status_lines), ("metrics", server.metrics_text))]
        for thread in readers:
            thread.start()
        window_ends = time.monotonic() + 2.0  # the readers run side by side: one 2 s window
        for thread in readers:  # the loop is held: an answer now was read off the loop
            thread.join(max(window_ends - time.monotonic(), 0))
        assert not answers, "read the sessions while the loop thread was busy: %r" % answers
        release.set()
        for thread in readers:
            thread.join(10)
        assert answers["status"][1:] == ["pods connected: 3", "streams open: 6"], answers
        text = answers["metrics"].encode()
        assert metric(text, "pipe2me_pods_connected") == 3, text
        assert metric(text, "pipe2me_streams_open") == 6, text
    finally:
        release.set()
        server.loop.stop()
        looping.join(10)


def limited_pod(workdir, pod_dir, max_fds):
    """`start` of `pod_dir` in a process that may hold at most `max_fds` descriptors."""
    limit = ("import os,resource,sys;resource.setrlimit(resource.RLIMIT_NOFILE,(%d,%d));"
             "os.execv(sys.executable,[sys.executable]+sys.argv[1:])" % (max_fds, max_fds))
    proc = Proc([sys.executable, "-c", limit, POD, "--dir", pod_dir, "start"], workdir,
                "limited-pod")
    proc.wait_for(r"tunnel up")
    return proc


def echoes(sock, payload):
    """Whether `payload` sent on `sock` comes back whole."""
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def test_safety_pod_stream_that_cannot_open_ends_alone(bed, workdir):
    """A pod out of descriptors (a local socket cannot even be made) for a
    crowd of new consumers: each of those streams is reset, the failure is
    logged on one line each; the session and the streams already open go on."""
    identity = Identity(bed.server, os.path.join(workdir, "limited"), "tcp", [bed.echo.port])
    pod = limited_pod(workdir, identity.dir, 48)
    kept, crowd = [], []
    try:
        kept = [connect(identity.ports[0]) for _ in range(4)]
        for sock in kept:
            assert echoes(sock, b"before the crowd\n")
        crowd = [connect(identity.ports[0]) for _ in range(120)]
        for sock in crowd:
            sock.sendall(b"x")
        pod.wait_for(r"internal error contained in=\w+ error=OSError: \[Errno 24\]", timeout=20)
        ended = 0
        for sock in crowd:   # the server closes those the pod reset
            sock.settimeout(10)
            try:
                ended += sock.recv(1) != b"x"
            except OSError:
                ended += 1
        assert ended, "no consumer of the crowd was refused: the limit was not reached"
        for sock in crowd:
            sock.close()
        crowd = []
        for sock in kept:
            assert echoes(sock, b"after the crowd\n"), pod.stderr()[-3000:]
        assert pod.alive(), pod.stderr()[-3000:]
        assert "tunnel down" not in pod.stderr(), pod.stderr()[-3000:]
        assert "Traceback" not in pod.stderr()
        assert echo_round_trip(identity.ports[0], b"a new stream\n") == b"a new stream\n"
    finally:
        for sock in kept + crowd:
            sock.close()
        assert pod.stop() == 0


# =====================================================================================
# 1. Bounded memory, whatever peers do
# =====================================================================================

def settle_rss(server, seconds=1.0):
    """The server's RSS once it has stopped moving (or after a few seconds)."""
    last = server.rss()
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
        now = server.rss()
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


def rss_back_to(server, ceiling, timeout=15.0):
    """The server's RSS once it is below `ceiling`, or its last reading after `timeout`:
    memory comes back only once the loop has handled the closes."""
    deadline = time.monotonic() + timeout
    rss = server.rss()
    while rss >= ceiling and time.monotonic() < deadline:
        time.sleep(0.1)
        rss = server.rss()
    return rss


def ping_frames(mod, size, count):
    return mod.encode_frame(mod.Msg.PING, 0, b"p" * size) * count


FLOODS = {
    # name: frames a pod that never reads sends, given (mod, stream id)
    "ping-256k": lambda mod, _s: ping_frames(mod, mod.MAX_FRAME_BYTES, 600),        # 150 MiB
    "ping-16k": lambda mod, _s: ping_frames(mod, 16384, 8000),                      # 125 MiB
    "ping-empty": lambda mod, _s: ping_frames(mod, 0, 400000),                       # 3.6 MB
    "ping-and-window": lambda mod, s: (ping_frames(mod, 65536, 1) + mod.encode_frame(
        mod.Msg.WINDOW, s, mod.U32.pack(0)) * 64) * 1500,                           # 96 MiB
}


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_safety_pod_flooding_control_frames_never_reading_is_bounded(bed, server_mod, flood):
    """A pod with a valid certificate that asks for replies and never reads
    them: the server's memory stays within a few MiB (replies dropped past a
    small bound), the pod stays connected, and when it leaves the memory is
    back within a few MiB of idle."""
    idle = settle_rss(bed.server)
    pod = welcomed_pod(server_mod, bed.server, bed.raw, rcvbuf=4096)
    consumer = connect(bed.raw.ports[0])    # a stream, for the WINDOW frames
    stream = 1
    frames = FLOODS[flood](server_mod, stream)
    sender = threading.Thread(target=pod.send, args=(frames,), daemon=True)
    sender.start()
    peak, deadline = idle, time.monotonic() + 60
    while sender.is_alive() and time.monotonic() < deadline:
        peak = max(peak, bed.server.rss())
        sender.join(0.05)
    assert not sender.is_alive(), "the server stopped reading the pod"
    peak = max(peak, settle_rss(bed.server))
    grown = (peak - idle) / MiB
    bed.assert_live_tunnel_served()
    consumer.close()
    pod.close()
    after = settle_rss(bed.server, 3.0)
    print("\n%s: sent %.1f MiB, server RSS idle %.1f MiB, peak +%.1f MiB, after +%.1f MiB"
          % (flood, len(frames) / MiB, idle / MiB, grown, (after - idle) / MiB))
    assert grown < 12, "server RSS grew %.1f MiB" % grown
    assert after - idle < 4 * MiB
    bed.server.assert_alive()


def pushing_handler(conn):
    """A service that sends as long as anybody takes it (a download)."""
    chunk = b"d" * 65536
    conn.settimeout(30)
    for _ in range(1024):           # at most 64 MiB per connection
        conn.sendall(chunk)


def lazy_consumers(port, count, source=None):
    """Consumers that connect, ask, and never read."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if source:
            sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        socks.append(sock)
    return socks


@pytest.fixture
def push_bed(workdir, request):
    # a test may ask for more flags: @pytest.mark.parametrize("push_bed", [[...]], indirect=True)
    extra = getattr(request, "param", [])
    server = Server(workdir, ["--max-buffered-bytes", "24M",
                              "--max-buffered-bytes-per-tunnel", "8M"] + list(extra))
    b = Bed(server, workdir)
    b.push = LocalService(pushing_handler)
    b.pusher = Identity(server, os.path.join(workdir, "push"), "tcp", [b.push.port])
    b.push_pod = start_pod(workdir, b.pusher.dir, name="push-pod")
    b.push2 = Identity(server, os.path.join(workdir, "push2"), "tcp", [b.push.port])
    b.push2_pod = start_pod(workdir, b.push2.dir, name="push2-pod")
    yield b
    assert b.push_pod.stop() == 0
    assert b.push2_pod.stop() == 0
    b.push.stop()
    b.stop()


def test_safety_consumers_that_never_read_stay_within_the_budgets(push_bed):
    """300 anonymous consumers ask two pushing tunnels for a download and
    never read: the server holds at most MAX_BUFFERED_BYTES (24M here) plus a
    fixed overhead, not a stream window each; the other tunnel is served
    all along; memory comes back when they leave."""
    b = push_bed
    idle = settle_rss(b.server)
    pod_idle = rss_bytes(b.push_pod.pid)
    crowd = lazy_consumers(b.pusher.ports[0], 200, FLOOD_SOURCE)
    crowd += lazy_consumers(b.push2.ports[0], 100, OTHER_SOURCE)
    peak, deadline = idle, time.monotonic() + 20
    # until both tunnels' budgets (8M each) are nearly full: then nothing more is read
    while (metric(api(b.server, "GET", "/metrics")[1], "pipe2me_buffered_bytes") or 0) < 15 * MiB:
        assert time.monotonic() < deadline, "the lazy consumers never filled the budgets"
        peak = max(peak, b.server.rss())
        time.sleep(0.1)
    started = time.monotonic()
    b.assert_live_tunnel_served()
    served_in = time.monotonic() - started
    peak = max(peak, settle_rss(b.server))
    pod_peak = rss_bytes(b.push_pod.pid)
    text = api(b.server, "GET", "/metrics")[1]
    buffered = metric(text, "pipe2me_buffered_bytes")
    for sock in crowd:
        sock.close()
    after = rss_back_to(b.server, idle + 6 * MiB)
    print("\n300 lazy consumers: server RSS idle %.1f MiB, peak +%.1f MiB, after +%.1f MiB; "
          "buffered %s; pod RSS %.1f -> %.1f MiB; live tunnel served in %.2f s"
          % (idle / MiB, (peak - idle) / MiB, (after - idle) / MiB, buffered,
             pod_idle / MiB, pod_peak / MiB, served_in))
    assert buffered is not None and buffered <= 24 * MiB + 2 * MiB
    assert peak - idle < (24 + 24) * MiB
    assert after - idle < 6 * MiB
    assert pod_peak - pod_idle < 16 * MiB
    assert served_in < SERVED_S
    b.server.assert_alive()


@pytest.mark.parametrize("push_bed", [["--buffer-stall", "1"]], indirect=True)
def test_safety_stalled_readers_make_room_for_new_consumers(push_bed):
    """When one tunnel's budget is full of readers that never read, those are
    reset after BUFFER_STALL (1 s here), and a consumer who does read gets the download."""
    b = push_bed
    crowd = lazy_consumers(b.pusher.ports[0], 60, FLOOD_SOURCE)
    wait_for_metric(b.server, "pipe2me_buffered_bytes", 6 * MiB)   # the tunnel's 8M is filling
    started = time.monotonic()
    with connect(b.pusher.ports[0]) as sock:
        sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        # each round of resets takes BUFFER_STALL (1 s here): slow on a loaded machine
        got, deadline = 0, time.monotonic() + 60
        while got < 2 * MiB and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            assert data, "the download ended early"
            got += len(data)
    took = time.monotonic() - started
    for sock in crowd:
        sock.close()
    print("\nreading consumer got 2 MiB %.2f s after 60 lazy ones filled the budget" % took)
    assert got >= 2 * MiB
    log = b.server.proc.stderr()
    assert "reader stalled under buffer pressure" in log


# =====================================================================================
# 2. Shares: the tunnel handshake slots and the API's workers
# =====================================================================================

def silent_connections(port, sources, per_source, first_bytes=b""):
    """Connections that send `first_bytes` (or nothing) and then stay silent."""
    socks = []
    for source in sources:
        for _ in range(per_source):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
                if first_bytes:
                    sock.sendall(first_bytes)
            except OSError:
                sock.close()
                continue
            socks.append(sock)
    return socks


def client_hello_prefix():
    """The first 40 bytes of a real ClientHello: a handshake that never completes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=DOMAIN)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()[:40]


HANDSHAKE_FLOODS = {
    # name: (sources, connections per source, first bytes)
    "one-address-silent": ([FLOOD_SOURCE], 100, b""),
    "one-address-half-hello": ([FLOOD_SOURCE], 100, "hello"),
    "forty-addresses": (["127.0.0.%d" % n for n in range(20, 60)], 3, b""),
}


@pytest.mark.parametrize("flood", sorted(HANDSHAKE_FLOODS))
def test_safety_handshake_flood_never_locks_a_pod_out(bed, server_mod, flood):
    """Strangers hold the tunnel port's handshake slots (silent, or halfway
    through a ClientHello, from one address or from forty): a pod with a
    valid certificate still gets WELCOMEd (bench/attacks.py: within 1 s), from another
    address and from the flooding address itself; later arrivals of the
    flood are refused or displaced."""
    sources, per_source, first = HANDSHAKE_FLOODS[flood]
    if first == "hello":
        first = client_hello_prefix()
    flood_socks = silent_connections(bed.server.tunnel, sources, per_source, first)
    flooded_at = time.monotonic()
    try:
        for source in ("127.0.0.1", sources[0]):
            if source == sources[0]:  # the flood's own address: once its slots may rotate
                wait_until(lambda: time.monotonic() - flooded_at
                           >= server_mod.HANDSHAKE_ROTATE_AFTER_S, 5,
                           what="the flood's handshakes to be old enough to give way")
            started = time.monotonic()
            pod = welcomed_pod(server_mod, bed.server, bed.raw, source=source)
            took = time.monotonic() - started
            pod.close()
            print("\n%s: %d connections held, pod from %s welcomed in %.3f s"
                  % (flood, len(flood_socks), source, took))
            assert took < SERVED_S
    finally:
        for sock in flood_socks:
            sock.close()
    bed.server.assert_alive()


def test_safety_quick_handshakes_behind_one_address_do_not_cut_each_other_off(server_mod):
    """Many pods behind one NAT reconnect at once (a server restart): past the
    source's share a newcomer is refused while the others are still quick,
    and displaces only a handshake that has waited HANDSHAKE_ROTATE_AFTER_S
    (a stranger's stalled one), never one in its first moments."""
    shares = server_mod.SourceShares(64, 4, server_mod.HANDSHAKE_ROTATE_AFTER_S)
    pairs = [socket.socketpair() for _ in range(6)]
    try:
        held = [a for a, _ in pairs[:4]]
        assert all(shares.take(sock, "192.0.2.1") for sock in held)
        assert not shares.take(pairs[4][0], "192.0.2.1")      # all four still quick
        assert shares.take(pairs[5][0], "198.51.100.7")       # another source: room
        oldest = held[0]
        source, taken = shares.holders[oldest]
        shares.holders[oldest] = (source, taken - server_mod.HANDSHAKE_ROTATE_AFTER_S)
        assert shares.take(pairs[4][0], "192.0.2.1")          # the stalled one gives way
        assert oldest not in shares.holders
        assert pairs[0][1].recv(1) == b""                     # ... shut down, its thread ends
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_safety_handshakes_past_the_share_wait_for_a_slot(workdir, server_mod):
    """Pods behind one NAT reconnect at once (a server restart), here with a
    share of one handshake per source: the connections that come while the
    first is still in its handshake wait for the slot it gives back instead
    of being cut off, and each is WELCOMEd in turn."""
    server = Server(workdir, settings={"MAX_PENDING_HANDSHAKES_PER_SOURCE": "1"})
    identity = Identity(server, os.path.join(workdir, "raw"), "tcp")
    waiting = silent_connections(server.tunnel, [FLOOD_SOURCE], 3)
    try:
        assert len(waiting) == 3
        # from another address: the server accepts in order, so once this one
        # is welcomed it has taken (or refused) all three
        welcomed_pod(server_mod, server, identity).close()
        for sock in waiting:
            pod = RawPod(server_mod, server.tunnel, identity.cacert, identity.cert,
                         identity.key, connected=sock)
            event = pod.hello(identity.id)
            assert event is not None and event[0] == server_mod.Msg.WELCOME, event
            pod.close()
    finally:
        for sock in waiting:
            sock.close()
        assert server.stop() == 0
    assert "pod handshake cap reached" not in server.proc.stderr()


def test_safety_handshake_waiting_room_leaves_room_for_other_sources(workdir, server_mod):
    """One address floods past its share (70 more silent connections, share
    one): it may hold only its part of the waiting room, so a pod from another
    address that comes while that address's one slot is taken still waits,
    and is WELCOMEd once the slot is given back."""
    server = Server(workdir, settings={"MAX_PENDING_HANDSHAKES_PER_SOURCE": "1"})
    identity = Identity(server, os.path.join(workdir, "raw"), "tcp")
    mark = server.mark()
    flood = silent_connections(server.tunnel, [FLOOD_SOURCE], 71)
    held, waiting = silent_connections(server.tunnel, [OTHER_SOURCE], 2)
    try:
        server.proc.wait_for(r"pod handshake cap reached, closing pod=%s:"
                             % re.escape(FLOOD_SOURCE), after=mark)  # past its part: refused
        held.close()  # the other address's slot is given back: the waiting one takes it
        pod = RawPod(server_mod, server.tunnel, identity.cacert, identity.cert, identity.key,
                     connected=waiting)
        event = pod.hello(identity.id)
        assert event is not None and event[0] == server_mod.Msg.WELCOME, event
        pod.close()
    finally:
        for sock in flood + [held, waiting]:
            sock.close()
        assert server.stop() == 0
    assert "closing pod=%s:" % OTHER_SOURCE not in server.log_after(mark)


def test_safety_api_bodies_that_never_come_leave_room_for_others(bed):
    """Requests that announce a body and never send it, 100 from one address
    and then 4 each from twenty more: a client from yet another address gets
    its answer (bench/attacks.py: within 1 s); the flooding address gets 429
    past its share."""
    head = ("POST /tunnels HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{" % DOMAIN).encode()
    flood = silent_connections(bed.server.http, [FLOOD_SOURCE], 100, head)
    try:
        bed.server.proc.wait_for(r"api connection cap reached, closing from=%s:"
                                 % re.escape(FLOOD_SOURCE), timeout=10)  # its share is held
        started = time.monotonic()
        status, _ = api(bed.server, "GET", "/config", source=OTHER_SOURCE, timeout=5)
        took = time.monotonic() - started
        assert status == 200 and took < SERVED_S, (status, took)
        started = time.monotonic()
        own = api(bed.server, "GET", "/config", source=FLOOD_SOURCE, timeout=5)[0]
        own_took = time.monotonic() - started
        flood += silent_connections(bed.server.http, ["127.0.0.%d" % n for n in range(60, 80)],
                                    4, head)
        # a request sent after the second flood is answered once the front has read its heads
        assert api(bed.server, "GET", "/config", source="127.0.0.91", timeout=5)[0] == 200
        started = time.monotonic()
        status2, _ = api(bed.server, "GET", "/config", source="127.0.0.90", timeout=5)
        took2 = time.monotonic() - started
        print("\napi: %d slow requests held; a stranger served in %.3f s, then %.3f s; the "
              "flooding address in %.3f s" % (len(flood), took, took2, own_took))
        assert status2 == 200 and took2 < SERVED_S, (status2, took2)
        assert own == 429, own
    finally:
        for sock in flood:
            sock.close()
    bed.server.assert_alive()


# =====================================================================================
# 4. max_traffic stops a session within one read of the cap
# =====================================================================================

MAX_OVERSHOOT = 256 * 1024   # one read: READ_CHUNK_BYTES / TLS_READ_BYTES


def tunnel_file(server, tunnel_id):
    with open(os.path.join(server.state_dir, "tunnels", tunnel_id + ".json")) as fh:
        return json.load(fh)


def download(port, within_s=30):
    """Bytes a reading consumer gets before the connection ends."""
    got = 0
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = sock.recv(1 << 20)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            got += len(data)
    return got


def upload(port, nbytes):
    sent = 0
    with connect(port) as sock:
        chunk = b"u" * 65536
        try:
            while sent < nbytes:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


@pytest.mark.parametrize("direction", ["download", "upload", "both"])
def test_safety_max_traffic_cuts_within_one_read_of_the_cap(workdir, direction):
    """A max_traffic:1M token: however fast the consumers push or pull, and
    however often they try again, the tunnel moves at most 256 KiB past the
    cap in its life, and its pod is then refused for good."""
    server = Server(workdir, tokens=["%s = max_ports:1 max_traffic:1M" % TINY_TOKEN])
    services = [LocalService(pushing_handler), LocalService(echo_handler)]
    service = services[0] if direction == "download" else services[1]
    tunnel = Identity(server, os.path.join(workdir, "tiny"), "tcp", [service.port], TINY_TOKEN)
    pod = start_pod(workdir, tunnel.dir, name="tiny-pod")
    got, sessions = 0, 0
    try:
        port = tunnel.ports[0]
        while pod.alive() and sessions < 6:
            sessions += 1
            if direction == "download":
                got += download(port)
            elif direction == "upload":
                got += upload(port, 64 * MiB)
            else:
                results = []
                workers = [threading.Thread(target=lambda: results.append(upload(port, 64 * MiB)))
                           for _ in range(4)]
                for thread in workers:
                    thread.start()
                for thread in workers:
                    thread.join(60)
                got += sum(results)
            wait_until(lambda: server.proc.stderr().count("traffic allowance used up tunnel=%s"
                                                          % tunnel.id) >= sessions,
                       what="the session to be cut")
            wait_until(lambda: not pod.alive() or pod.stderr().count("tunnel up") > sessions,
                       timeout=20, what="the pod to reconnect or exit")
        wait_until(lambda: not pod.alive(), timeout=20, what="the refused pod to exit")
        record = tunnel_file(server, tunnel.id)
        moved = record["bytes_in"] + record["bytes_out"]
        print("\nmax_traffic 1M, %s: %d sessions, consumer side %d bytes, counted %d bytes "
              "(over the cap by %d)" % (direction, sessions, got, moved, moved - MiB))
        assert moved <= MiB + MAX_OVERSHOOT
        if direction == "download":
            assert got <= MiB + MAX_OVERSHOOT
        assert pod.popen.returncode == 4
    finally:
        pod.stop()
        for service in services:
            service.stop()
        assert server.stop() == 0


# =====================================================================================
# 5. No leaks, no injection
# =====================================================================================

def test_safety_metrics_name_tenants_only_to_whom_the_operator_allows(workdir):
    """/metrics and the status page: tenant names and per-tunnel traffic for
    127.0.0.1 (METRICS_ALLOW) and for the METRICS_TOKEN bearer; totals only
    for any other address, a wrong token, or the token in another header."""
    secret = "metrics-bearer-for-the-test"
    server = Server(workdir, ["--metrics-token", secret])
    try:
        tunnel = Identity(server, os.path.join(workdir, "tenant"), "tcp")
        name = tunnel.fqdn.encode()
        cases = {
            "loopback": ("127.0.0.1", {}, True),
            "other address": (FLOOD_SOURCE, {}, False),
            "other address, token": (FLOOD_SOURCE, {"Authorization": "Bearer " + secret}, True),
            "other address, wrong token": (FLOOD_SOURCE, {"Authorization": "Bearer x" + secret},
                                           False),
            "other address, token as Basic": (FLOOD_SOURCE, {"Authorization": "Basic " + secret},
                                              False),
        }
        for case, (source, headers, named) in cases.items():
            for path in ("/metrics", "/"):
                status, body = api(server, "GET", path, source=source, headers=headers)
                assert status == 200, (case, path, status)
                assert (name in body) == (named and path == "/metrics"), (case, path, body[:300])
                if path == "/metrics":
                    assert metric(body, "pipe2me_tunnels{status=\"online\"}") == 1, (case, body)
                    assert b'pipe2me_bytes_total{direction="in"}' in body
    finally:
        assert server.stop() == 0


LOG_INJECTIONS = [
    "bye\n2026-01-01 00:00:00,000 INFO pipe2me.server tunnel created tunnel=forged",
    "bye\r\x1b[2Kforged\u2028line\x00",
]


@pytest.fixture(scope="module")
def log_server(tmp_path_factory):
    """One server for the GOAWAY log tests below: each makes its own tunnel
    (raw_identity) and reads the log from its own mark, so none needs another."""
    server = Server(str(tmp_path_factory.mktemp("goaway")))
    yield server
    assert server.stop() == 0


@pytest.fixture
def raw_identity(log_server, tmp_path):
    """A tunnel of its own on log_server for a hand-made pod."""
    return Identity(log_server, str(tmp_path / "raw"), "tcp")


@pytest.mark.parametrize("reason", LOG_INJECTIONS)
def test_safety_control_characters_from_a_pod_never_start_a_log_line(log_server, raw_identity,
                                                                     server_mod, reason):
    """A GOAWAY reason with CR, LF, escape sequences or Unicode line breaks
    reaches the log on its one line, escaped."""
    mark = log_server.mark()
    pod = welcomed_pod(server_mod, log_server, raw_identity)
    pod.send(server_mod.encode_control(server_mod.Msg.GOAWAY, {"reason": reason}))
    log_server.proc.wait_for(r"pod going away tunnel=%s" % raw_identity.id, after=mark)
    pod.close()
    log = log_server.log_after(mark)
    assert "forged" in log
    for line in log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ pipe2me\.server ", line), line
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]", line), line
    assert "tunnel=forged" not in re.sub(r"reason=.*", "", log)


def test_safety_refused_connection_lines_are_summarised(workdir, server_mod):
    """Silent connections to TUNNEL_PORT from one address: past the source's
    share and the room for those waiting, 100 are refused at once, and of
    those refusals at most LOG_REPEAT_LIMIT lines are shown, then one line
    saying how many more there were (at the end of the window, here at
    shutdown)."""
    server = Server(workdir)
    refused = "pod handshake cap reached"
    held = int(server_mod.CONFIG_KEYS["MAX_PENDING_HANDSHAKES_PER_SOURCE"][0])
    flood = silent_connections(server.tunnel, [FLOOD_SOURCE],
                               held + server_mod.HANDSHAKE_WAITING_MAX + 100)
    try:
        wait_until(lambda: server.proc.stderr().count(refused) >= 20, timeout=20,
                   what="the refused handshakes to be logged")
    finally:
        for sock in flood:
            sock.close()
        assert server.stop() == 0
    log = server.proc.stderr()
    limit = server_mod.LOG_REPEAT_LIMIT
    shown = log.count(refused)
    summary = re.findall(r"(\d+) more like this in the last 60 s: " + refused, log)
    print("\n100 refused handshakes: %d lines shown, summary %s" % (shown, summary))
    assert shown <= limit + 1, shown
    assert summary and int(summary[0]) + limit >= 100 - 5, summary


def test_safety_token_guesses_from_many_addresses_get_429(workdir):
    """25 addresses x 10 wrong tokens (each under the per-address limit):
    the global limit answers 429 long before the 250th guess, also to a
    fresh address."""
    server = Server(workdir)
    try:
        statuses = []
        for n in range(25):
            for guess in range(10):
                statuses.append(api(server, "POST", "/tunnels", {
                    "token": "guess-%d-%d" % (n, guess), "protocols": ["tcp"]},
                    source="127.0.0.%d" % (100 + n))[0])
        fresh = api(server, "POST", "/tunnels", {"token": "one-more-guess", "protocols": ["tcp"]},
                    source="127.0.0.200")[0]
        first_429 = statuses.index(429) if 429 in statuses else None
        print("\n250 guesses from 25 addresses: first 429 at guess %s, %d answered 429; "
              "a fresh address got %d" % (first_429, statuses.count(429), fresh))
        assert first_429 is not None and first_429 <= 110
        assert fresh == 429
        assert set(statuses) <= {403, 429}
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("reason", [None, 12, {"nested": ["a\nb"]}])
def test_safety_goaway_reason_of_any_type_is_logged_not_a_crash(log_server, raw_identity,
                                                                server_mod, reason):
    mark = log_server.mark()
    pod = welcomed_pod(server_mod, log_server, raw_identity)
    pod.send(server_mod.encode_control(server_mod.Msg.GOAWAY, {"reason": reason}))
    log_server.proc.wait_for(r"pod going away tunnel=%s" % raw_identity.id, after=mark)
    pod.close()
    log_server.proc.wait_for(r"pod disconnected tunnel=%s" % raw_identity.id, after=mark)
    assert "internal error" not in log_server.log_after(mark)
    log_server.assert_alive()


def test_safety_a_hello_version_reaches_the_log_escaped_and_short(log_server, raw_identity, server_mod):
    """A HELLO's version is the pod's text: a line break in it never starts a log
    line, and a long one is cut, however big the frame."""
    mark = log_server.mark()
    pod = RawPod(server_mod, log_server.tunnel, raw_identity.cacert, raw_identity.cert,
                 raw_identity.key)
    event = pod.hello(raw_identity.id, version=LOG_INJECTIONS[1] + "v" * 100000)
    assert event is not None and event[0] == server_mod.Msg.REJECT, event
    line = log_server.proc.wait_for(r"pod refused pod=.*", after=mark).group(0)
    assert "\x1b" not in line and "\u2028" not in line and len(line) < 2000, len(line)
