"""Tunnels end to end (issue 3, acceptance points 1-9): a real server, real
pods running `start`, and real consumers (curl, openssl s_client, ssh, raw
sockets) on 127.0.0.1.

Local services that a test needs beyond `start --echo` run in this process
(LocalService); every pod, server and sshd is a child process stopped by its
PID. Waiting is always for a condition with a deadline. Figures measured on
the way (throughput, server memory) are printed; run with -s to see them."""

import getpass
import hashlib
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (copy_pod_dir, echo_handler, connect, recv_to_eof, echo_round_trip, MiB, POD, SERVER, Proc, ServerHandle, free_port, public_ports, run_pod,
                      setup_pod, start_pod, wait_until)
from helpers import api, cert_sha256, curl_ok

BIG_BYTES = 100 * MiB
HEARTBEAT_S = 1                       # conftest starts every server with --heartbeat-interval 1
RSS_SLACK_BYTES = 8 * MiB             # allowed server growth beyond the stalled stream's window
SHORT_LIFESPAN_S = 4                  # setup, start and one echo fit in it on a loaded machine


# ---- clients -------------------------------------------------------------------------------

def closed_within(port, seconds):
    """Connect and wait for the server to close (EOF or reset); returns the time it took.
    Fails if the connection is refused or still open after `seconds`."""
    sock = connect(port)
    started = time.monotonic()
    try:
        sock.settimeout(seconds)
        try:
            data = sock.recv(1)
        except socket.timeout:
            raise AssertionError("port %d still open after %.1f s" % (port, seconds))
        except ConnectionResetError:
            data = b""
        assert data == b"", data
        return time.monotonic() - started
    finally:
        sock.close()


def transfer_each_way(port, data, timeout=60.0):
    """Send data through an echo on one connection while reading it back;
    returns (sha256 of what came back, bytes back, seconds)."""
    sock = connect(port)
    errors = []

    def send_all():
        try:
            view = memoryview(data)
            for start in range(0, len(view), MiB):
                sock.sendall(view[start:start + MiB])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)
    started = time.monotonic()
    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    digest, count = hashlib.sha256(), 0
    buffer = bytearray(MiB)
    deadline = started + timeout
    with sock:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            size = sock.recv_into(buffer)
            if not size:
                break
            digest.update(memoryview(buffer)[:size])
            count += size
        elapsed = time.monotonic() - started
    sender.join(timeout)
    assert not errors and not sender.is_alive(), errors
    return digest.hexdigest(), count, elapsed


def concurrent_echoes(port, payloads, timeout=60.0):
    """One selectors loop driving len(payloads) connections to an echo at once:
    each sends its payload, half-closes and reads until EOF. Returns what each got."""
    selector = selectors.DefaultSelector()
    got = [bytearray() for _ in payloads]
    offsets = [0] * len(payloads)
    for index, payload in enumerate(payloads):
        sock = connect(port)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, index)
    open_count, deadline = len(payloads), time.monotonic() + timeout
    while open_count:
        assert time.monotonic() < deadline, "%d of %d streams unfinished" % (open_count, len(payloads))
        for key, mask in selector.select(0.5):
            sock, index = key.fileobj, key.data
            if mask & selectors.EVENT_WRITE:
                payload = payloads[index]
                if offsets[index] < len(payload):
                    try:
                        offsets[index] += sock.send(payload[offsets[index]:offsets[index] + 256 * 1024])
                    except BlockingIOError:
                        pass
                if offsets[index] >= len(payload):
                    sock.shutdown(socket.SHUT_WR)
                    selector.modify(sock, selectors.EVENT_READ, index)
            if mask & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(256 * 1024)
                except BlockingIOError:
                    continue
                if chunk:
                    got[index] += chunk
                    continue
                selector.unregister(sock)
                sock.close()
                open_count -= 1
    selector.close()
    return [bytes(g) for g in got]


def fill_until_stalled(sock, quiet_s=0.5, limit=512 * MiB):
    """Write into a connection whose reader never reads until no byte is taken
    for quiet_s; returns how many bytes went in."""
    sock.setblocking(False)
    block, sent = os.urandom(256 * 1024), 0
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_WRITE)
    try:
        while sent < limit:
            try:
                sent += sock.send(block)
                continue
            except BlockingIOError:
                pass
            if not selector.select(quiet_s):
                return sent
        raise AssertionError("%d bytes went into a stream nobody reads" % sent)
    finally:
        selector.close()


# ---- files and processes ----------------------------------------------------------------------

def pod_info(pod_dir):
    """pipe2me.info.inc as sh reads it."""
    script = 'set -a; . "$1"; set +a; env'
    out = subprocess.run(["sh", "-c", script, "sh", os.path.join(pod_dir, "pipe2me.info.inc")],
                         capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"]}).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line.startswith("PIPE2ME_"))


def pod_status(pod_dir):
    done = run_pod(pod_dir, "status")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def server_admin(server, *args):
    return subprocess.run([sys.executable, SERVER, "--state-dir", server.state_dir] + list(args),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=server.env)


def memory_bytes(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid, encoding="ascii") as fh:
        match = re.search(r"^%s:\s+(\d+) kB" % field, fh.read(), re.M)
    return int(match.group(1)) * 1024


def stop_pod(proc):
    """SIGCONT (a frozen pod cannot handle SIGTERM), then SIGTERM by PID; returns
    the exit code and fails on a traceback."""
    if proc.alive():
        os.kill(proc.pid, signal.SIGCONT)
    code = proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]
    return code


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One server for the tests that do not restart or reconfigure it."""
    workdir = str(tmp_path_factory.mktemp("tunnels"))
    server = ServerHandle(workdir)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def echo_pod(hub):
    """A pod with http,https,tcp running `start --echo` on the shared server:
    (pod dir, fqdn, {protocol: public port}, pod process)."""
    pod_dir = os.path.join(hub.workdir, "echo-pod")
    fqdn = setup_pod(hub, pod_dir, "http,https,tcp", [free_port(), free_port(), free_port()])
    ports = dict(zip(("http", "https", "tcp"), public_ports(pod_dir)))
    proc = start_pod(hub.workdir, pod_dir, "--echo", name="echo-pod")
    yield pod_dir, fqdn, ports, proc
    assert stop_pod(proc) == 0




@pytest.fixture
def pods(workdir):
    """Pod processes started by a test, stopped by PID after it."""
    started = []

    def start(pod_dir, *extra, name="pod", wait=True):
        proc = start_pod(workdir, pod_dir, *extra, name=name, wait=wait)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        stop_pod(proc)


# ---- 1. echo through the http port, the HTTP front and the HTTPS front --------------------

def test_tunnel_echo_through_public_port_and_fronts(hub, echo_pod):
    pod_dir, fqdn, ports, _proc = echo_pod
    direct = curl_ok("--resolve", "%s:%d:127.0.0.1" % (fqdn, ports["http"]),
                     "http://%s:%d/x" % (fqdn, ports["http"]))
    assert direct == b"GET /x HTTP/1.1\n"
    by_host = curl_ok("--resolve", "%s:%d:127.0.0.1" % (fqdn, hub.http),
                      "http://%s:%d/x" % (fqdn, hub.http))
    assert by_host == b"GET /x HTTP/1.1\n"
    cacert = os.path.join(pod_dir, "pipe2me.cacert")
    by_sni = curl_ok("--cacert", cacert, "--resolve", "%s:%d:127.0.0.1" % (fqdn, hub.https),
                     "https://%s:%d/x" % (fqdn, hub.https))
    assert by_sni == b"GET /x HTTP/1.1\n"
    public_https = curl_ok("--cacert", cacert, "--resolve", "%s:%d:127.0.0.1" % (fqdn, ports["https"]),
                           "https://%s:%d/y" % (fqdn, ports["https"]))
    assert public_https == b"GET /y HTTP/1.1\n"
    # The API stays on the bare address of the same front.
    config = json.loads(curl_ok("http://127.0.0.1:%d/config" % hub.http))
    assert config["https_port"] == hub.https


def test_tunnel_server_and_start_run_from_compiled_code_with_their_arguments(hub, echo_pod):
    """Both long-running processes re-executed themselves once from compiled
    code under -S, keeping their PID (the one the test started) and their
    arguments: the pod's --echo services answer."""
    pod_dir, _fqdn, ports, proc = echo_pod
    for process, script, args in ((hub.proc, SERVER, hub.argv()[2:]),
                                  (proc, POD, ["--dir", pod_dir, "start", "--echo"])):
        with open("/proc/%d/cmdline" % process.pid, "rb") as fh:
            argv = fh.read().decode().split("\0")[:-1]
        assert argv[1:3] == ["-S", "-c"] and "marshal.load" in argv[3], argv
        assert argv[4:] == [script] + args
    assert echo_round_trip(ports["tcp"], b"compiled\n") == b"compiled\n"


def test_tunnel_run_from_compiled_code_does_nothing_when_imported(server_mod, pod_mod):
    for module in (server_mod, pod_mod):
        assert module.run_from_compiled_code({"PIPE2ME_TEST_VARIABLE": "1"}) is None
        assert "PIPE2ME_TEST_VARIABLE" not in os.environ


def test_tunnel_script_code_is_the_code_compiled_at_start(server_mod, pod_mod):
    """The re-exec hands over the code the interpreter compiled for the
    script (its <module> frame on the stack) instead of compiling the file
    again; called from anywhere else it compiles the file."""
    for module, path in ((server_mod, SERVER), (pod_mod, POD)):
        namespace = vars(module)
        exec(compile("found = script_code(%r)" % path, "<started script>", "exec"), namespace)
        assert namespace.pop("found").co_filename == "<started script>"
        assert module.script_code(path).co_filename == path


def test_tunnel_https_front_shows_the_pods_own_certificate(hub, echo_pod):
    pod_dir, fqdn, _ports, _proc = echo_pod
    done = subprocess.run(["openssl", "s_client", "-servername", fqdn,
                           "-connect", "127.0.0.1:%d" % hub.https],
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    shown = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----",
                      done.stdout.decode(), re.S)
    assert shown, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    with open(os.path.join(pod_dir, "pipe2me.openssl.cert"), encoding="ascii") as fh:
        own = fh.read()
    assert cert_sha256(shown.group(0)) == cert_sha256(own)
    # and not the server's own certificate, which the bare name gets
    bare = subprocess.run(["openssl", "s_client", "-servername", "pipe2.localhost",
                          "-connect", "127.0.0.1:%d" % hub.https],
                         capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    api_pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----",
                        bare.stdout.decode(), re.S)
    assert api_pem and cert_sha256(api_pem.group(0)) != cert_sha256(own)


# ---- 2. HTTP front: redirect for https-only tunnels, 404 for unknown names -------------------

def test_tunnel_http_front_redirects_https_only_and_404s_unknown(hub, workdir):
    pod_dir = os.path.join(workdir, "https-only")
    fqdn = setup_pod(hub, pod_dir, "https", [free_port()])
    https_url = pod_info(pod_dir)["PIPE2ME_URLS_0"]
    head = curl_ok("-I", "--resolve", "%s:%d:127.0.0.1" % (fqdn, hub.http),
                   "http://%s:%d/p?q=1" % (fqdn, hub.http)).decode()
    assert re.match(r"HTTP/1\.[01] 308 ", head), head
    location = re.search(r"^location: (\S+)\r?$", head, re.M | re.I)
    assert location and location.group(1) == https_url + "/p?q=1", head
    assert https_url.startswith("https://%s:" % fqdn)
    unknown = "no-such-tunnel.pipe2.localhost"
    missing = curl_ok("-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                      "%s:%d:127.0.0.1" % (unknown, hub.http),
                      "http://%s:%d/p" % (unknown, hub.http))
    assert missing == b"404"


# ---- 3. volume: 100 MB each way on one stream, 200 concurrent streams -----------------------

def test_tunnel_100mb_each_way_on_one_stream_byte_exact(echo_pod):
    _pod_dir, _fqdn, ports, _proc = echo_pod
    data = os.urandom(BIG_BYTES)
    digest, count, seconds = transfer_each_way(ports["tcp"], data)
    assert count == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    print("\n100 MiB each way through one stream: %.2f s, %.0f MB/s each way"
          % (seconds, len(data) / seconds / 1e6))


def test_tunnel_200_concurrent_streams_byte_exact(echo_pod):
    _pod_dir, _fqdn, ports, _proc = echo_pod
    rng = random.Random(3)
    blob = os.urandom(4 * MiB)
    payloads = []
    for _ in range(200):
        size = rng.choice([0, 1, rng.randrange(2, 4096), rng.randrange(4096, 256 * 1024),
                           rng.randrange(256 * 1024, 2 * MiB)])
        start = rng.randrange(0, len(blob) - size + 1)
        payloads.append(blob[start:start + size])
    started = time.monotonic()
    got = concurrent_echoes(ports["tcp"], payloads)
    wrong = [i for i, (sent, back) in enumerate(zip(payloads, got)) if sent != back]
    assert not wrong, ["stream %d: sent %d got %d" % (i, len(payloads[i]), len(got[i]))
                       for i in wrong[:10]]
    print("\n200 concurrent streams, %.1f MiB each way: %.2f s"
          % (sum(map(len, payloads)) / MiB, time.monotonic() - started))


def test_tunnel_stream_opened_while_mux_congested_reads_once_it_drains(server_mod):
    """In-process regression: a stream that becomes readable while its Mux is
    congested must be woken when the Mux drains (it used to lose its read
    interest for good, so 200 concurrent echoes sometimes never saw EOF)."""
    import logging
    mod = server_mod
    loop = mod.EventLoop()
    a, b = socket.socketpair()
    server_mux = mod.Mux(loop, a, mod.POD_SENDS, logging.getLogger("test"))
    pod_mux = mod.Mux(loop, b, mod.SERVER_SENDS, logging.getLogger("test"))
    service, pod_side = socket.socketpair()
    pod_mux.on_open = lambda stream_id, port, *_ends: pod_mux.add_stream(stream_id, pod_side)
    consumer, server_side = socket.socketpair()
    consumer.settimeout(0)
    pod_mux.congested = True   # as if its send buffer were above the high water mark
    mod.PodSession.open_stream(server_mux, server_side, 80)  # the server's opener on a bare Mux
    service.sendall(b"answer")
    service.shutdown(socket.SHUT_WR)
    got = bytearray()

    def run_until(condition, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "relay stuck: consumer got %r" % bytes(got)
            loop.call_later(0.01, lambda: None)
            loop.run_once()

    def consumer_done():
        try:
            chunk = consumer.recv(4096)
        except BlockingIOError:
            return False
        got.extend(chunk)
        return not chunk
    run_until(lambda: pod_mux.streams)
    assert not got
    pod_mux.flush()            # the send buffer drained
    run_until(consumer_done)
    assert bytes(got) == b"answer"
    for sock in (service, consumer):
        sock.close()
    server_mux.destroy("test over")
    pod_mux.destroy("test over")


# ---- 4. half-close both ways -------------------------------------------------------------------

@pytest.fixture
def service_pod(hub, workdir, services, pods):
    """Start a pod with one tcp service handled in this process: returns its public port."""
    def start(handler, name="svc-pod"):
        service = services(handler)
        pod_dir = os.path.join(workdir, name)
        setup_pod(hub, pod_dir, "tcp", [service.port])
        pods(pod_dir, name=name)
        return public_ports(pod_dir)[0]
    return start


def test_tunnel_half_close_consumer_side(service_pod):
    def answer_after_eof(conn):
        request = recv_to_eof(conn)
        conn.sendall(hashlib.sha256(request).hexdigest().encode() + b"\n" + request)
        conn.shutdown(socket.SHUT_WR)
    port = service_pod(answer_after_eof)
    request = os.urandom(3 * MiB)
    with connect(port) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        response = recv_to_eof(sock)
    assert response == hashlib.sha256(request).hexdigest().encode() + b"\n" + request


def test_tunnel_half_close_pod_side(service_pod):
    speech = os.urandom(3 * MiB)
    heard = queue.Queue()

    def speak_first(conn):
        conn.sendall(speech)
        conn.shutdown(socket.SHUT_WR)
        heard.put(recv_to_eof(conn))
    port = service_pod(speak_first)
    reply = os.urandom(3 * MiB)
    with connect(port) as sock:
        assert recv_to_eof(sock) == speech   # the service is done talking ...
        sock.sendall(reply)                  # ... and still listens
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    assert heard.get(timeout=20) == reply


# ---- 5. a consumer that never reads ------------------------------------------------------------

@pytest.mark.slow
def test_tunnel_stalled_consumer_bounded_memory_others_flow(hub, echo_pod, server_mod):
    _pod_dir, _fqdn, ports, _proc = echo_pod
    data = os.urandom(BIG_BYTES)
    transfer_each_way(ports["tcp"], data[:16 * MiB])  # warm the relay's buffers
    before = memory_bytes(hub.proc.pid)
    stalled = connect(ports["tcp"])
    try:
        # The echo answers into a consumer that never reads: the answer fills the
        # stream's window, the echo blocks, and the consumer's own sends stop.
        pushed = fill_until_stalled(stalled)
        assert pushed > server_mod.STREAM_WINDOW_BYTES
        peak, done = [memory_bytes(hub.proc.pid)], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak.append(memory_bytes(hub.proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        digest, count, seconds = transfer_each_way(ports["tcp"], data)
        done.set()
        sampler.join(5)
        assert count == len(data) and digest == hashlib.sha256(data).hexdigest()
        grown = max(peak) - before
        print("\nstalled consumer took %.1f MiB; 100 MiB each way beside it in %.2f s; "
              "server RSS %.1f MiB -> peak %.1f MiB (+%.1f MiB, limit %.1f)"
              % (pushed / MiB, seconds, before / MiB, max(peak) / MiB, grown / MiB,
                 (server_mod.STREAM_WINDOW_BYTES + RSS_SLACK_BYTES) / MiB))
        assert grown <= server_mod.STREAM_WINDOW_BYTES + RSS_SLACK_BYTES
    finally:
        stalled.close()
    assert echo_round_trip(ports["tcp"]) == b"ping through pipe2me\n"


# ---- 6. server restart, frozen pod, takeover -------------------------------------------------

@pytest.mark.slow
def test_tunnel_pod_back_after_server_killed_and_restarted(server, workdir, pods):
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_pod(server, pod_dir, "tcp", [free_port()])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir, "--echo")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    seen = len(pod.stderr())
    started = time.monotonic()
    server.restart()  # SIGKILL, then the same state and ports
    again = pod.wait_for(r"tunnel up fqdn=(\S+)", timeout=10, after=seen)
    took = time.monotonic() - started
    print("\npod back %.1f s after the server was killed" % took)
    assert took <= 10
    assert again.group(1) == fqdn
    assert public_ports(pod_dir) == [port]
    assert echo_round_trip(port) == b"ping through pipe2me\n"


class HeldLikeAnOutgoingConnection:
    """A connected socket whose local port is `port`, bound the way the kernel
    binds an outgoing connection (no SO_REUSEADDR), so no listener can take
    the port. release() closes the far end first: the held side then leaves
    no TIME_WAIT on the port."""

    def __init__(self, port):
        self.far = socket.create_server(("127.0.0.1", 0))
        self.near = socket.socket()
        self.near.bind(("127.0.0.1", port))
        self.near.connect(self.far.getsockname())
        self.accepted, _ = self.far.accept()

    def release(self):
        self.accepted.close()
        self.near.settimeout(5)
        assert self.near.recv(1) == b""
        self.near.close()
        self.far.close()


def test_tunnel_setup_skips_a_public_port_another_socket_holds(server, workdir, pods):
    first = server.tunnel_ports[0]
    held = HeldLikeAnOutgoingConnection(first)
    try:
        pod_dir = os.path.join(workdir, "pod")
        setup_pod(server, pod_dir, "tcp", [free_port()])
        port = public_ports(pod_dir)[0]
        assert port != first and port in server.tunnel_ports
        pods(pod_dir, "--echo")
        assert echo_round_trip(port) == b"ping through pipe2me\n"
    finally:
        held.release()


@pytest.mark.slow
def test_tunnel_public_port_held_at_restart_listens_once_freed(server, workdir, pods):
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [free_port()])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir, "--echo")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    server.proc.stop(signal.SIGKILL)
    held = HeldLikeAnOutgoingConnection(port)
    try:
        seen = len(pod.stderr())
        server.start(fixed_ports=True)
        server.proc.wait_for(r"public port unavailable, retrying every \S+ tunnel=\S+ "
                             r"error=cannot listen on 127.0.0.1 port %d" % port)
        pod.wait_for(r"tunnel up", after=seen)
    finally:
        held.release()
    server.proc.wait_for(r"public port listening tunnel=\S+ port=%d" % port, timeout=10)
    assert echo_round_trip(port) == b"ping through pipe2me\n"


@pytest.mark.slow
def test_tunnel_frozen_pod_replaced_at_once_and_declared_dead(server, workdir, pods, services):
    echo = services(echo_handler)
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [echo.port])
    tunnel_id = pod_info(pod_dir)["PIPE2ME_ID"]
    port = public_ports(pod_dir)[0]
    first = pods(pod_dir, name="pod-a")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    seen = len(server.proc.stderr())
    os.kill(first.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    second = pods(copy_pod_dir(pod_dir, "b"), name="pod-b")  # same tunnel, first frozen
    server.proc.wait_for(r"pod disconnected tunnel=%s \S+ reason=replaced" % tunnel_id,
                         timeout=5, after=seen)
    took = time.monotonic() - frozen_at
    assert took < 3 * HEARTBEAT_S, "takeover waited %.1f s" % took
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    # Now freeze the second one: no FIN, only silence.
    seen = len(server.proc.stderr())
    os.kill(second.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    server.proc.wait_for(r"pod disconnected tunnel=%s \S+ reason=peer silent" % tunnel_id,
                         timeout=3 * HEARTBEAT_S + 3, after=seen)
    dead_after = time.monotonic() - frozen_at
    print("\nfrozen pod replaced after %.2f s; silent pod declared dead after %.2f s "
          "(heartbeat %d s)" % (took, dead_after, HEARTBEAT_S))
    assert dead_after <= 3 * HEARTBEAT_S + 1.5
    assert closed_within(port, 1.0) < 1.0


# ---- 7. pod offline, local service down ----------------------------------------------------

def test_tunnel_pod_offline_consumer_closed_within_1s(hub, workdir, pods):
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(hub, pod_dir, "tcp", [free_port()])
    port = public_ports(pod_dir)[0]
    never_started = closed_within(port, 1.0)
    pod = pods(pod_dir, "--echo")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    seen = len(hub.proc.stderr())
    assert stop_pod(pod) == 0
    hub.proc.wait_for(r"pod disconnected tunnel=%s " % pod_info(pod_dir)["PIPE2ME_ID"], after=seen)
    stopped = closed_within(port, 1.0)
    print("\noffline pod: consumer closed after %.3f s (never started), %.3f s (stopped)"
          % (never_started, stopped))


def test_tunnel_local_service_down_then_back(hub, workdir, pods, services):
    local_port = free_port()
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(hub, pod_dir, "tcp", [local_port])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir)
    seen = len(pod.stderr())
    with connect(port) as sock:
        sock.sendall(b"anyone there?")
        try:
            assert recv_to_eof(sock, timeout=5) == b""
        except ConnectionResetError:
            pass
    pod.wait_for(r"WARNING .*local service (refused|unavailable)", timeout=5, after=seen)
    assert pod.alive()
    status = wait_until(lambda: pod_status(pod_dir).get("CONNECTED") == "yes", timeout=5,
                        what="status CONNECTED=yes")
    assert status
    services(echo_handler, port=local_port)
    assert echo_round_trip(port) == b"ping through pipe2me\n"


# ---- 8. expired tunnel ----------------------------------------------------------------------

def setup_short_lived_pod(server, pod_dir, lifespan_s=SHORT_LIFESPAN_S):
    """A one-port tcp tunnel from a token of lifespan_s; returns its FQDN."""
    seen = len(server.proc.stderr())
    added = server_admin(server, "tokens", "add", "short-lived-token",
                         "lifespan:%d" % lifespan_s, "max_ports:1")
    assert added.returncode == 0, added.stderr
    server.proc.wait_for(r"reloaded tokens=", after=seen)
    return setup_pod(server, pod_dir, "tcp", [free_port()], token="short-lived-token")


@pytest.mark.slow
def test_tunnel_expired_pod_rejected_exit_4_and_ports_closed(server, workdir, pods):
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_short_lived_pod(server, pod_dir)
    expires_at = int(pod_info(pod_dir)["PIPE2ME_EXPIRES_AT"])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir, "--echo")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    wait_until(lambda: not pod.alive(), timeout=SHORT_LIFESPAN_S + 8,
               what="the pod of an expired tunnel to exit")
    assert time.time() >= expires_at
    assert pod.popen.returncode == 4, pod.stderr()[-2000:]
    last = pod.stderr().strip().splitlines()[-1]
    assert "expired" in last and fqdn in last, last
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()
    again = run_pod(pod_dir, "start", "--echo", timeout=30)
    assert again.returncode == 4, again.stderr
    assert "expired" in again.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_tunnel_expired_certificate_of_extended_tunnel_refused_until_update(server, workdir, pods):
    """The server judges certificate expiry itself (after HELLO, to give a reason):
    an extended tunnel whose pod kept its old certificate is refused, not let in."""
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_short_lived_pod(server, pod_dir, lifespan_s=2)  # extended at once: no start to fit in
    info = pod_info(pod_dir)
    extended = api(server, "POST", "/tunnels/%s/extend" % info["PIPE2ME_ID"],
                   {"token": server.token}, secret=info["PIPE2ME_SECRET"])
    assert extended.json()["status"] == "online", extended.body
    cert_end = int(info["PIPE2ME_EXPIRES_AT"])
    wait_until(lambda: time.time() > cert_end + 1, timeout=6, interval=0.1,
               what="the first certificate to expire")
    stale = run_pod(pod_dir, "start", "--echo", timeout=30)
    assert stale.returncode == 4, stale.stderr
    last = stale.stderr.strip().splitlines()[-1]
    assert "certificate" in last and "expired" in last and fqdn in last, last
    assert run_pod(pod_dir, "update").returncode == 0
    pod = pods(pod_dir, "--echo")
    assert pod.alive()
    assert echo_round_trip(public_ports(pod_dir)[0]) == b"ping through pipe2me\n"


# ---- 9. ssh through a tcp tunnel ------------------------------------------------------------

@pytest.fixture
def sshd(workdir):
    """A private sshd on a free port with throwaway keys: (port, client key path, user)."""
    if not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("sshd, ssh or ssh-keygen not installed")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd's privilege separation directory, made by its init script, which a
        # container (or CI, where the package must not start its daemon) never ran
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    base = os.path.join(workdir, "sshd")
    os.makedirs(base)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(base, name)],
                       check=True, capture_output=True, timeout=30)
    shutil.copy(os.path.join(base, "user_key.pub"), os.path.join(base, "authorized_keys"))
    config = os.path.join(base, "sshd_config")
    with open(config, "w", encoding="ascii") as fh:
        fh.write("ListenAddress 127.0.0.1\nHostKey %s/host_key\nPidFile %s/sshd.pid\n"
                 "AuthorizedKeysFile %s/authorized_keys\nStrictModes no\nUsePAM no\n"
                 "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                 "PermitRootLogin prohibit-password\nLogLevel VERBOSE\n" % (base, base, base))
    port = free_port()
    proc = Proc(["/usr/sbin/sshd", "-D", "-e", "-f", config, "-p", str(port)], workdir, "sshd")
    try:
        try:
            proc.wait_for(r"Server listening on 127\.0\.0\.1 port %d" % port, timeout=10)
        except AssertionError:
            pytest.skip("sshd does not start here: %s" % proc.stderr().strip()[-300:])
        yield port, os.path.join(base, "user_key"), getpass.getuser()
    finally:
        proc.stop()


@pytest.mark.slow
def test_tunnel_ssh_session_through_tcp_tunnel(hub, workdir, pods, sshd):
    sshd_port, key, user = sshd
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(hub, pod_dir, "tcp", [sshd_port])
    port = public_ports(pod_dir)[0]
    pods(pod_dir)
    ssh = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", key, "-o", "IdentitiesOnly=yes",
           "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
           "%s@127.0.0.1" % user]
    done = subprocess.run(ssh + ["echo", "hello-through-pipe2me"], capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"hello-through-pipe2me\n"
    data = os.urandom(4 * MiB)
    piped = subprocess.run(ssh + ["sha256sum"], input=data, capture_output=True, timeout=60)
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


# ---- status and traffic counters ------------------------------------------------------------

def tunnel_bytes(server, tunnel_id):
    shown = server_admin(server, "tunnels", "show", tunnel_id)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    return view["bytes_in"], view["bytes_out"]


def api_tunnel(server, pod_dir):
    info = pod_info(pod_dir)
    return api(server, "GET", "/tunnels/" + info["PIPE2ME_ID"],
               secret=info["PIPE2ME_SECRET"]).json()


@pytest.mark.slow
def test_tunnel_status_and_traffic_counters(hub, workdir, pods):
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(hub, pod_dir, "tcp", [free_port()])
    tunnel_id = pod_info(pod_dir)["PIPE2ME_ID"]
    port = public_ports(pod_dir)[0]
    assert tunnel_bytes(hub, tunnel_id) == (0, 0)
    assert pod_status(pod_dir).get("CONNECTED") == "no"
    pod = pods(pod_dir, "--echo")
    up = wait_until(lambda: (lambda s: s if s.get("CONNECTED") == "yes" else None)(pod_status(pod_dir)),
                    timeout=5, what="status CONNECTED=yes")
    assert int(up["BYTES_IN"]) == 0 and int(up["BYTES_OUT"]) == 0
    payload = os.urandom(MiB)
    assert echo_round_trip(port, payload) == payload
    with connect(port) as held:  # a live stream while status is read
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        busy = wait_until(lambda: (lambda s: s if s.get("STREAMS") == "1" and
                                   int(s.get("BYTES_IN", 0)) >= len(payload) + 1 else None)(
                              pod_status(pod_dir)),
                          timeout=6, what="status with one stream and the bytes")
    assert busy["CONNECTED"] == "yes"
    assert int(busy["BYTES_OUT"]) >= len(payload) + 1
    seen = len(hub.proc.stderr())
    assert stop_pod(pod) == 0
    hub.proc.wait_for(r"pod disconnected tunnel=%s " % tunnel_id, after=seen)
    bytes_in, bytes_out = tunnel_bytes(hub, tunnel_id)
    assert bytes_in >= len(payload) + 1 and bytes_out >= len(payload) + 1
    view = api_tunnel(hub, pod_dir)
    assert (view["bytes_in"], view["bytes_out"]) == (bytes_in, bytes_out)
