"""Faults (issue 4, points 1-7): real servers and pods as processes, real
consumers on 127.0.0.1 (or inside network namespaces this file creates).

1. server SIGKILL + restart with 3 pods and live streams
2. a black-holed pod (SIGSTOP; nftables drop inside namespaces, as root)
3. 50 pod flaps and 10,000 short consumer connections: fds and RSS come back
4. RLIMIT_NOFILE exhaustion of the server by a connection flood
5. STATE_DIR full or read-only during a setup (as root, on a small tmpfs)
6. 1,000 streams of random sizes with half-closes from either side
7. SIGTERM with live streams, for the server and for the pod

Every process is stopped by its PID; every wait is for a condition with a
deadline. Figures measured on the way are printed (run with -s to see them)."""

import contextlib
import datetime
import errno
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import (copy_pod_dir, echo_handler, connect, recv_to_eof, echo_round_trip, MiB, POD, SERVER, Proc, ServerHandle, free_port, pod_env, public_ports,
                      run_pod, setup_pod, wait_until)
from helpers import api, make_csr, make_key

KiB = 1024
HEARTBEAT_S = 1                       # conftest starts every server with --heartbeat-interval 1
DETECT_SLACK_S = 0.5                  # log flush and polling on top of 3 heartbeats
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_NETNS_TOOLS = all(shutil.which(tool) for tool in ("ip", "nft"))


# ---- consumers -------------------------------------------------------------------------------

def end_of(sock, timeout):
    """How a connection ends: "eof" or "reset" within timeout, else AssertionError.
    Data still arriving is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("connection still open after %.1f s" % timeout)
        sock.settimeout(left)
        try:
            if not sock.recv(MiB):
                return "eof"
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return "reset"


def refused(port, host="127.0.0.1"):
    """True when nothing listens on port any more (ECONNREFUSED)."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == errno.ECONNREFUSED


# ---- processes -------------------------------------------------------------------------------

def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss_bytes(pid):
    with open("/proc/%d/status" % pid, encoding="ascii") as fh:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", fh.read(), re.M).group(1)) * KiB


def pod_info(pod_dir):
    env = pod_env(pod_dir)
    return {"id": env["PIPE2ME_ID"], "fqdn": env["PIPE2ME_FQDN"], "ports": public_ports(pod_dir)}


def server_admin(server, *args):
    return subprocess.run([sys.executable, SERVER, "--state-dir", server.state_dir] + list(args),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def tunnel_files(state_dir):
    """{id: record} of every tunnel file; fails if one is not readable JSON."""
    tunnel_dir = os.path.join(state_dir, "tunnels")
    records = {}
    for name in sorted(os.listdir(tunnel_dir)):
        if name.endswith(".json"):
            with open(os.path.join(tunnel_dir, name), encoding="utf-8") as fh:
                record = json.load(fh)
            records[record["id"]] = record
    return records


def identity(record):
    """What must survive any fault: who the tunnel is, where, until when."""
    keys = ("id", "fqdn", "protocols", "ports", "secret_sha256", "cert_sha256", "expires_at")
    return {key: record[key] for key in keys}


def stop_checked(proc, timeout=20.0):
    """SIGTERM (after SIGCONT, for a frozen one) by PID; exit code, no traceback allowed."""
    if proc.alive():
        os.kill(proc.pid, signal.SIGCONT)
    code = proc.stop(timeout=timeout)
    assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]
    return code




class PodSet:
    """Pod `start` processes of a test. stop_all() (also run at teardown):
    each one still running must exit 0 on SIGTERM without a traceback; the
    ones a test killed itself are skipped."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.started = []

    def __call__(self, pod_dir, *extra, name="pod", wait=True, prefix=()):
        argv = list(prefix) + [sys.executable, POD, "--dir", pod_dir, "start"] + list(extra)
        proc = Proc(argv, self.workdir, name)
        self.started.append(proc)
        if wait:
            proc.wait_for(r"tunnel up")
        return proc

    def stop_all(self):
        """SIGTERM to all at once (so their exits overlap); returns the seconds taken."""
        started = time.monotonic()
        signalled = [proc for proc in self.started if proc.alive()]
        for proc in signalled:              # one SIGTERM each: a second one could land
            os.kill(proc.pid, signal.SIGCONT)  # while Python is finalizing (default action)
            os.kill(proc.pid, signal.SIGTERM)
        for proc in signalled:
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                proc.stop(signal.SIGKILL)
            assert proc.popen.returncode == 0, proc.stderr()[-2000:]
            assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]
        return time.monotonic() - started


@pytest.fixture
def pods(workdir):
    pod_set = PodSet(workdir)
    yield pod_set
    pod_set.stop_all()


# ---- 1. server SIGKILL + restart with 3 pods and live streams ---------------------------------

class Pump:
    """A consumer stream kept busy through an echo: send a block, read it back,
    again, until the connection ends. `ended` is (how, monotonic time)."""

    def __init__(self, port):
        self.sock = connect(port)
        self.rounds = 0
        self.ended = None
        self.block = os.urandom(32 * KiB)
        self.first = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        how = "error"
        try:
            self.sock.settimeout(30)
            while True:
                self.sock.sendall(self.block)
                got = 0
                while got < len(self.block):
                    chunk = self.sock.recv(len(self.block) - got)
                    if not chunk:
                        raise EOFError
                    got += len(chunk)
                self.rounds += 1
                self.first.set()
        except EOFError:
            how = "eof"
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except OSError as exc:
            how = "error %s" % exc
        self.ended = (how, time.monotonic())
        self.first.set()
        self.sock.close()


def without_presence(listing):
    """`tunnels list` without its CONNECTED and SINCE columns (the pods come and go)."""
    return [row.split()[:3] + row.split()[5:] for row in listing.splitlines()]


@pytest.mark.slow
def test_faults_server_killed_with_live_streams_pods_back_state_intact(server, workdir, pods,
                                                                       services):
    echo = services(echo_handler)
    pod_dirs = [os.path.join(workdir, "pod%d" % i) for i in range(3)]
    for pod_dir in pod_dirs:
        setup_pod(server, pod_dir, "tcp,ssh", [echo.port, echo.port])
    before = {d: pod_info(d) for d in pod_dirs}
    files_before = {i: identity(r) for i, r in tunnel_files(server.state_dir).items()}
    listed_before = without_presence(server_admin(server, "tunnels", "list").stdout)
    procs = {d: pods(d, name=os.path.basename(d)) for d in pod_dirs}
    pumps = [Pump(port) for d in pod_dirs for port in before[d]["ports"]]
    for pump in pumps:
        assert pump.first.wait(10) and pump.ended is None, pump.ended
    seen = {d: len(procs[d].stderr()) for d in pod_dirs}
    killed_at = time.monotonic()
    server.restart()  # SIGKILL, then the same state dir and listener ports
    restarted = time.monotonic() - killed_at
    back = {}
    for d in pod_dirs:
        match = procs[d].wait_for(r"tunnel up fqdn=(\S+)", timeout=10, after=seen[d])
        back[d] = time.monotonic() - killed_at
        assert match.group(1) == before[d]["fqdn"]
    wait_until(lambda: all(p.ended for p in pumps), timeout=5, what="every pumped stream ended")
    closes = [(p.ended[0], p.ended[1] - killed_at, p.rounds) for p in pumps]
    wait_until(lambda: len(echo.ends) >= len(pumps), timeout=5,
               what="the pods closed the service side of every stream")
    print("\nserver restarted in %.2f s; pods back after %s s; streams ended %s; "
          "service side %s" % (restarted, ["%.2f" % back[d] for d in pod_dirs],
                               [(how, "%.2f s" % t, n) for how, t, n in closes], echo.ends))
    assert all(how in ("eof", "reset") and t < 3.0 for how, t, _ in closes), closes
    assert all(how in ("eof", "reset") for how in echo.ends), echo.ends
    assert max(back.values()) <= 10
    assert without_presence(server_admin(server, "tunnels", "list").stdout) == listed_before
    assert {i: identity(r) for i, r in tunnel_files(server.state_dir).items()} == files_before
    for d in pod_dirs:
        assert pod_info(d) == before[d]
        for port in before[d]["ports"]:
            assert echo_round_trip(port) == b"ping through pipe2me\n"
    assert "Traceback" not in server.proc.stderr()


# ---- 2. a black-holed pod: declared dead within 3 heartbeats, replaced at once ---------------

def wait_disconnect(server, tunnel_id, reason, after, timeout, pod=r"\S+"):
    return server.proc.wait_for(r"pod disconnected tunnel=%s pod=%s reason=%s"
                                % (tunnel_id, pod, reason), timeout=timeout, after=after)


@pytest.mark.slow
def test_faults_frozen_pod_declared_dead_then_new_session_takes_over(server, workdir, pods,
                                                                   services):
    echo = services(echo_handler)  # outside the pods: a frozen pod would hold an --echo port
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [echo.port])
    tunnel_id, port = pod_info(pod_dir)["id"], public_ports(pod_dir)[0]
    first = pods(pod_dir, name="pod-a")
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    in_flight = connect(port)
    in_flight.sendall(b"live")
    assert in_flight.recv(4) == b"live"
    seen = len(server.proc.stderr())
    os.kill(first.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    wait_disconnect(server, tunnel_id, "peer silent", seen, 3 * HEARTBEAT_S + 3)
    dead_after = time.monotonic() - frozen_at
    stream_end = end_of(in_flight, 1.0)
    in_flight.close()
    seen = len(server.proc.stderr())
    started = time.monotonic()
    second = pods(copy_pod_dir(pod_dir, "b"), name="pod-b")  # the same tunnel from a copy
    server.proc.wait_for(r"pod connected tunnel=%s" % tunnel_id, after=seen)
    took_over = time.monotonic() - started
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    # Freeze the new one and start a third at once: it replaces the silent
    # session without waiting for the heartbeat verdict.
    seen = len(server.proc.stderr())
    os.kill(second.pid, signal.SIGSTOP)
    started = time.monotonic()
    pods(copy_pod_dir(pod_dir, "c"), name="pod-c")
    wait_disconnect(server, tunnel_id, "replaced", seen, 3 * HEARTBEAT_S)
    replaced_after = time.monotonic() - started
    assert echo_round_trip(port) == b"ping through pipe2me\n"
    print("\nfrozen pod declared dead after %.2f s (heartbeat %d s; in-flight stream: %s); "
          "new session up %.2f s after `start`; silent session replaced after %.2f s"
          % (dead_after, HEARTBEAT_S, stream_end, took_over, replaced_after))
    assert dead_after <= 3 * HEARTBEAT_S + DETECT_SLACK_S
    assert replaced_after < 3 * HEARTBEAT_S
    assert "Traceback" not in server.proc.stderr()


class Namespaces:
    """Three network namespaces made (and removed) here, every address private:

        a  eth0 10.211.N.2 --- a0 10.211.N.1   srv   b0 10.212.N.1 --- eth0 10.212.N.2  b

    The server runs in srv and listens on 10.211.N.1; pods in a and b reach it
    (b through its default route into srv)."""

    def __init__(self):
        tag = "%d-%04x" % (os.getpid(), random.getrandbits(16))
        self.ns = {role: "p2m-f%s-%s" % (role, tag) for role in ("srv", "a", "b")}
        net = random.randint(1, 254)
        self.server_ip = "10.211.%d.1" % net
        self.links = {"a": ("a0", "10.211.%d" % net), "b": ("b0", "10.212.%d" % net)}
        self.made = []

    def exec_prefix(self, role):
        return ["ip", "netns", "exec", self.ns[role]]

    def sh(self, *argv, input_text=None):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20,
                              input=input_text, stdin=None if input_text else subprocess.DEVNULL)
        assert done.returncode == 0, "%s: %s" % (" ".join(argv), done.stderr)
        return done.stdout

    def __enter__(self):
        for name in self.ns.values():
            self.sh("ip", "netns", "add", name)
            self.made.append(name)
            self.sh("ip", "-n", name, "link", "set", "lo", "up")
        srv = self.ns["srv"]
        for role, (inner, net) in self.links.items():
            self.sh("ip", "-n", srv, "link", "add", inner, "type", "veth", "peer", "name", "eth0",
                    "netns", self.ns[role])
            self.sh("ip", "-n", srv, "addr", "add", net + ".1/24", "dev", inner)
            self.sh("ip", "-n", srv, "link", "set", inner, "up")
            self.sh("ip", "-n", self.ns[role], "addr", "add", net + ".2/24", "dev", "eth0")
            self.sh("ip", "-n", self.ns[role], "link", "set", "eth0", "up")
            self.sh("ip", "-n", self.ns[role], "route", "add", "default", "via", net + ".1")
        return self

    def __exit__(self, *exc):
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        return False

    def black_hole(self, role):
        """Drop every packet on the namespace's link (no FIN, no RST: silence)."""
        ruleset = ('table inet blackhole {\n'
                   ' chain in { type filter hook input priority 0; iifname "eth0" drop; }\n'
                   ' chain out { type filter hook output priority 0; oifname "eth0" drop; }\n}\n')
        self.sh(*self.exec_prefix(role), "nft", "-f", "-", input_text=ruleset)

    def echo(self, role, port, payload="ping"):
        """An echo round trip from inside a namespace to the server's public port."""
        script = ("import socket,sys\n"
                  "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),5)\n"
                  "s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR); d=b''\n"
                  "while True:\n c=s.recv(4096)\n if not c: break\n d+=c\n"
                  "sys.stdout.write(d.decode())\n")
        return self.sh(*self.exec_prefix(role), sys.executable, "-c", script,
                       self.server_ip, str(port), payload)


class NamespacedServer(ServerHandle):
    """A ServerHandle whose process runs inside the srv namespace."""

    def __init__(self, workdir, nets):
        self.nets = nets
        super().__init__(workdir)

    def argv(self):
        argv = super().argv()
        argv[argv.index("--listen-address") + 1] = self.nets.server_ip
        return self.nets.exec_prefix("srv") + argv

    @property
    def url(self):
        return "http://%s:%d" % (self.nets.server_ip, self.http)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not (IS_ROOT and HAS_NETNS_TOOLS),
                    reason="needs root, ip and nft: network namespaces and nftables")
def test_faults_black_holed_pod_in_netns_replaced_at_once_and_declared_dead(workdir, pods):
    with Namespaces() as nets:
        server = None
        try:
            server = NamespacedServer(workdir, nets)
            pod_dir = os.path.join(workdir, "pod")
            os.makedirs(pod_dir)
            done = subprocess.run(nets.exec_prefix("a") + [
                sys.executable, POD, "--dir", pod_dir, "setup", "--server", server.url,
                "--auth", server.token, "--protocols", "tcp", "--local-ports", str(free_port())],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr
            tunnel_id, port = pod_info(pod_dir)["id"], public_ports(pod_dir)[0]
            link_a, link_b = nets.links["a"][1], nets.links["b"][1]
            pods(pod_dir, "--echo", name="pod-a", prefix=nets.exec_prefix("a"))
            assert nets.echo("srv", port) == "ping"
            seen = len(server.proc.stderr())
            nets.black_hole("a")
            holed_at = time.monotonic()
            pods(copy_pod_dir(pod_dir, "b"), "--echo", name="pod-b", prefix=nets.exec_prefix("b"))
            server.proc.wait_for(r"pod connected tunnel=%s fqdn=\S+ pod=%s\.2:"
                                 % (tunnel_id, link_b), after=seen, timeout=5)
            wait_disconnect(server, tunnel_id, "replaced", seen, 1,
                            pod=re.escape(link_a + ".2") + r":\d+")
            took_over = time.monotonic() - holed_at
            assert nets.echo("b", port, "via b") == "via b"
            seen = len(server.proc.stderr())
            nets.black_hole("b")
            holed_at = time.monotonic()
            wait_disconnect(server, tunnel_id, "peer silent", seen, 3 * HEARTBEAT_S + 3,
                            pod=re.escape(link_b + ".2") + r":\d+")
            dead_after = time.monotonic() - holed_at
            print("\nnetns: black-holed pod replaced %.2f s after the drop (new `start` included); "
                  "next black-holed pod declared dead after %.2f s (heartbeat %d s)"
                  % (took_over, dead_after, HEARTBEAT_S))
            assert took_over < 3 * HEARTBEAT_S
            assert dead_after <= 3 * HEARTBEAT_S + DETECT_SLACK_S
        finally:
            print("pods stopped in %.2f s" % pods.stop_all())
            if server is not None:
                assert server.stop() == 0


# ---- 3. 50 pod flaps and 10,000 short consumers: fds and RSS come back -----------------------

FLAPPING_PODS = 5
FLAPS_EACH = 10                       # 5 pods x 10 = 50 flaps, run side by side to save time
SHORT_CONNECTIONS = 10000
SHORT_CONCURRENCY = 32
RECOVERY_SLACK = 0.10

# A selectors echo service in its own process (a pod's --echo starts a thread
# per connection, which would make the pod the bottleneck): prints its port,
# echoes and half-closes, exits 0 on SIGTERM or after argv[1] seconds.
ECHO_SCRIPT = r"""
import selectors, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
deadline = time.monotonic() + float(sys.argv[1])
sel = selectors.DefaultSelector()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1024)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
print(srv.getsockname()[1], flush=True)
while time.monotonic() < deadline:
    for key, _ in sel.select(1.0):
        if key.fileobj is srv:
            try:
                conn = srv.accept()[0]
            except OSError:
                continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        try:
            if data:
                key.fileobj.setblocking(True)
                key.fileobj.sendall(data)
                key.fileobj.setblocking(False)
                continue
            key.fileobj.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sel.unregister(key.fileobj)
        key.fileobj.close()
"""


@pytest.fixture
def echo_process(workdir):
    """The port of an echo service running in its own process."""
    proc = Proc([sys.executable, "-c", ECHO_SCRIPT, "600"], workdir, "echo")
    port = int(proc.wait_for(r"(\d+)\n", stream="stdout").group(1))
    yield port
    assert proc.stop() == 0


def short_connections(port, count, concurrency=SHORT_CONCURRENCY, timeout=120.0):
    """count consumers, at most `concurrency` at once, driven by one selector:
    connect, send 16 bytes, read them back, close. Returns (ok, failures)."""
    selector = selectors.DefaultSelector()
    started = ok = failures = 0
    deadline = time.monotonic() + timeout

    def open_one(index):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, [b"short %09d\n" % index, b""])

    def finish(sock, good):
        selector.unregister(sock)
        sock.close()
        return good
    while ok + failures < count:
        assert time.monotonic() < deadline, "%d of %d consumers done" % (ok + failures, count)
        while started < count and started - ok - failures < concurrency:
            open_one(started)
            started += 1
        for key, mask in selector.select(1.0):
            sock, state = key.fileobj, key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(state[0])
                    selector.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(64)
            except OSError:
                failures += finish(sock, 1)
                continue
            state[1] += chunk
            if not chunk or state[1] == state[0]:
                good = state[1] == state[0]
                ok, failures = ok + finish(sock, good), failures + (not good)
    selector.close()
    return ok, failures


def flap(pods, pod_dir, server, tunnel_id, index):
    """Start a pod, wait until the server has its session, then end it:
    SIGTERM (clean close) or SIGKILL (the kernel closes) in turn."""
    seen = len(server.proc.stderr())
    proc = pods(pod_dir, name="flap-%s-%02d" % (tunnel_id[:6], index))
    server.proc.wait_for(r"pod connected tunnel=%s" % tunnel_id, after=seen)
    seen = len(server.proc.stderr())
    if index % 2:
        proc.stop(signal.SIGKILL)
    else:
        assert stop_checked(proc) == 0
    server.proc.wait_for(r"pod disconnected tunnel=%s" % tunnel_id, after=seen)


def flap_all(pods, server, tunnels, count):
    """`count` flaps of every pod, the pods side by side; returns the seconds taken."""
    errors = []

    def run(pod_dir, tunnel_id):
        try:
            for index in range(count):
                flap(pods, pod_dir, server, tunnel_id, index)
        except AssertionError as exc:
            errors.append(exc)
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=pair) for pair in tunnels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return time.monotonic() - started


def resources(pid):
    return fd_count(pid), rss_bytes(pid)


@pytest.mark.slow
def test_faults_flaps_and_10000_consumers_fds_and_rss_return(server, workdir, pods, echo_process):
    tunnels = []
    for index in range(FLAPPING_PODS):
        pod_dir = os.path.join(workdir, "pod%d" % index)
        setup_pod(server, pod_dir, "tcp", [echo_process])
        tunnels.append((pod_dir, pod_info(pod_dir)["id"]))
    port = public_ports(tunnels[0][0])[0]
    pid = server.proc.pid
    flap_all(pods, server, tunnels, 2)                           # warm-up
    pods(tunnels[0][0], name="pod-warm")
    assert short_connections(port, 1000) == (1000, 0)
    seen = len(server.proc.stderr())
    pods.stop_all()
    server.proc.wait_for(r"pod disconnected tunnel=%s" % tunnels[0][1], after=seen)
    base_fds, base_rss = resources(pid)
    flapped = flap_all(pods, server, tunnels, FLAPS_EACH)
    after_flaps = resources(pid)
    live = pods(tunnels[0][0], name="pod-live")
    started = time.monotonic()
    ok, failures = short_connections(port, SHORT_CONNECTIONS)
    elapsed = time.monotonic() - started
    peak = resources(pid)
    assert stop_checked(live) == 0

    def recovered():
        fds, rss = resources(pid)
        return (fds <= base_fds * (1 + RECOVERY_SLACK) and rss <= base_rss * (1 + RECOVERY_SLACK)
                and (fds, rss))
    started = time.monotonic()
    final = wait_until(recovered, timeout=15, interval=0.2,
                       what="fds and RSS back within 10 %% of %d fds / %.1f MiB (now %s)"
                       % (base_fds, base_rss / MiB, resources(pid)))
    print("\n%d flaps (%d pods side by side) in %.1f s; %d short consumers in %.1f s (%d/s, "
          "%d failed); server fds/RSS: baseline %d / %.1f MiB, after flaps %d / %.1f MiB, after "
          "consumers %d / %.1f MiB, final %d / %.1f MiB (%.1f s to settle)"
          % (FLAPPING_PODS * FLAPS_EACH, FLAPPING_PODS, flapped, ok, elapsed, ok / elapsed,
             failures, base_fds, base_rss / MiB, after_flaps[0], after_flaps[1] / MiB, peak[0],
             peak[1] / MiB, final[0], final[1] / MiB, time.monotonic() - started))
    assert (ok, failures) == (SHORT_CONNECTIONS, 0)


# ---- 4. file descriptors exhausted by a flood: the server survives and serves again ---------

FD_LIMIT = 256
FLOOD_CONNECTIONS = 400


class LimitedServer(ServerHandle):
    """A ServerHandle whose process runs with RLIMIT_NOFILE soft = hard = FD_LIMIT
    (prlimit execs the server, so the PID is the server's)."""

    def argv(self):
        return ["prlimit", "--nofile=%d:%d" % (FD_LIMIT, FD_LIMIT)] + super().argv()


@pytest.mark.slow
def test_faults_fd_exhaustion_server_survives_and_serves_again(workdir, pods, echo_process):
    server = LimitedServer(workdir)
    try:
        with open("/proc/%d/limits" % server.proc.pid) as fh:
            assert re.search(r"Max open files\s+%d\s+%d" % (FD_LIMIT, FD_LIMIT), fh.read())
        pod_dir = os.path.join(workdir, "pod")
        setup_pod(server, pod_dir, "tcp,ssh", [echo_process, echo_process])
        ports = public_ports(pod_dir)
        pod = pods(pod_dir, name="pod")
        seen = len(server.proc.stderr())
        flood = []
        for _ in range(FLOOD_CONNECTIONS):          # the backlog takes what accept() cannot
            flood.append(connect(ports[0]))
        server.proc.wait_for(r"accept paused listener=port %d error=.*Too many open files"
                             % ports[0], after=seen, timeout=10)
        at_limit = fd_count(server.proc.pid)
        waiting = connect(ports[1])                 # arrives while no descriptor is free
        waiting.sendall(b"queued consumer")
        waiting.shutdown(socket.SHUT_WR)
        waiting.settimeout(0.5)
        with pytest.raises(socket.timeout):
            waiting.recv(1)                         # not served while exhausted ...
        assert server.proc.alive()
        released = time.monotonic()
        for sock in flood:
            sock.close()
        assert recv_to_eof(waiting, timeout=10) == b"queued consumer"   # ... but not lost
        served_again = time.monotonic() - released
        waiting.close()
        server.proc.wait_for(r"accept resumed listener=", after=seen, timeout=5)
        for port in ports:
            assert echo_round_trip(port) == b"ping through pipe2me\n"
        assert api(server, "GET", "/config").status == 200
        assert api(server, "GET", "/config", tls=True).status == 200
        assert stop_checked(pod) == 0
        pods(pod_dir, name="pod-again")            # the tunnel port still accepts pods
        assert echo_round_trip(ports[0]) == b"ping through pipe2me\n"
        log_lines = [l for l in server.proc.stderr().splitlines() if "accept paused" in l]
        print("\nfd limit %d: %d flood connections, server at %d fds, %d 'accept paused' lines; "
              "queued consumer served %.2f s after the flood closed; fds now %d"
              % (FD_LIMIT, FLOOD_CONNECTIONS, at_limit, len(log_lines), served_again,
                 fd_count(server.proc.pid)))
        assert "Traceback" not in server.proc.stderr()
    finally:
        assert server.stop() == 0


# ---- 5. STATE_DIR full or read-only during a setup --------------------------------------------

STATE_TMPFS_SIZE = "2m"


def sh(*argv):
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, "%s: %s" % (" ".join(argv), done.stderr)


def fill_disk(directory, limit_bytes=64 * MiB):
    """Write a file until ENOSPC; returns its size."""
    written = 0
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as fh:
        block = b"\0" * (64 * KiB)
        while written < limit_bytes:
            try:
                written += fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
    raise AssertionError("%s took %d bytes without running full" % (directory, written))


class StateFault:
    """Break STATE_DIR (a small tmpfs mounted here) and repair it.

    "full": fill it to ENOSPC. "readonly": bind-mount it over itself read-only
    (a plain `remount,ro` is refused while the server holds its lock file open)."""

    def __init__(self, directory, kind):
        self.directory, self.kind, self.mounts = directory, kind, 0

    def mount(self):
        os.makedirs(self.directory)
        sh("mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % STATE_TMPFS_SIZE, "tmpfs",
           self.directory)
        self.mounts = 1

    def break_it(self):
        if self.kind == "full":
            return fill_disk(self.directory)
        sh("mount", "--bind", self.directory, self.directory)
        self.mounts += 1
        sh("mount", "-o", "remount,bind,ro", self.directory)
        return 0

    def repair(self):
        if self.kind == "full":
            os.unlink(os.path.join(self.directory, "filler"))
        else:
            sh("umount", self.directory)
            self.mounts -= 1

    def unmount(self):
        for _ in range(self.mounts):
            subprocess.run(["umount", self.directory], capture_output=True, timeout=30)
        self.mounts = 0


def tunnel_secret(pod_dir):
    with open(os.path.join(pod_dir, "pipe2me.info.inc")) as fh:
        return re.search(r"^PIPE2ME_SECRET='([^']*)'", fh.read(), re.M).group(1)


def assert_json_error(answer, status):
    assert answer.status == status, (answer.status, answer.body)
    message = answer.json()["error"]
    assert "cannot write state" in message and "\n" not in message, message
    return message


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not IS_ROOT, reason="needs root: mounts a tmpfs for STATE_DIR")
@pytest.mark.parametrize("kind", ["full", "readonly"])
def test_faults_state_dir_full_or_readonly_setup_fails_clearly_state_stays(workdir, pods,
                                                                         echo_process, kind):
    fault = StateFault(os.path.join(workdir, "state"), kind)
    fault.mount()
    server = None
    try:
        server = ServerHandle(workdir, state_dir=fault.directory)
        old_dir = os.path.join(workdir, "old-pod")
        setup_pod(server, old_dir, "tcp", [echo_process])
        old = pod_info(old_dir)
        secret = tunnel_secret(old_dir)
        pod = pods(old_dir, name="old-pod")
        assert echo_round_trip(old["ports"][0]) == b"ping through pipe2me\n"
        files_before = {i: identity(r) for i, r in tunnel_files(fault.directory).items()}
        seen = len(server.proc.stderr())
        filler = fault.break_it()
        status = 507 if kind == "full" else 503
        new_dir = os.path.join(workdir, "new-pod")
        done = run_pod(new_dir, "setup", "--server", server.url, "--auth", server.token,
                       "--protocols", "tcp")
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and "cannot write state" in lines[0], \
            done.stderr
        assert not os.path.exists(new_dir) or not os.listdir(new_dir)
        created = api(server, "POST", "/tunnels", {"token": server.token, "protocols": ["tcp"]})
        message = assert_json_error(created, status)
        csr = make_csr(make_key(os.path.join(workdir, "extra.key")), "/CN=" + old["fqdn"])
        signed = api(server, "POST", "/tunnels/%s/cert" % old["id"], {"csr": csr}, secret=secret)
        assert_json_error(signed, status)
        listed = server_admin(server, "tunnels", "list")
        assert listed.returncode == 0 and old["fqdn"] in listed.stdout, listed.stderr
        assert run_pod(old_dir, "verify").stdout.strip() == old["fqdn"]
        assert echo_round_trip(old["ports"][0]) == b"ping through pipe2me\n"
        assert stop_checked(pod) == 0          # the server saves traffic now: it cannot
        server.proc.wait_for(r"pod disconnected tunnel=%s" % old["id"], after=seen)
        server.proc.wait_for(r"traffic not saved tunnel=%s" % old["id"], after=seen)
        assert server.proc.alive()
        pod = pods(old_dir, name="old-pod-again")
        assert echo_round_trip(old["ports"][0]) == b"ping through pipe2me\n"
        assert {i: identity(r) for i, r in tunnel_files(fault.directory).items()} == files_before
        fault.repair()
        fqdn = setup_pod(server, new_dir, "tcp", [echo_process])
        assert run_pod(new_dir, "verify").stdout.strip() == fqdn
        leftovers = [n for n in os.listdir(os.path.join(fault.directory, "tunnels"))
                     if not n.endswith(".json")]
        print("\nSTATE_DIR %s (filler %d bytes): pod setup failed with %r; API %d %r; "
              "existing tunnel verified and relayed; setup after repair: %s"
              % (kind, filler, lines[0], status, message, fqdn))
        assert not leftovers, leftovers
        assert "Traceback" not in server.proc.stderr()
    finally:
        try:
            pods.stop_all()
            if server is not None:
                assert server.stop() == 0
        finally:
            fault.unmount()


# ---- 6. 1,000 streams of random sizes with half-closes from either side ----------------------

HALF_CLOSE_STREAMS = 1000
HALF_CLOSE_CONCURRENCY = 48
MAX_STREAM_BYTES = 256 * KiB
STREAM_HEADER = struct.Struct("!IIIB")    # stream index, consumer bytes, service bytes, mode
CONSUMER_FIRST = 0   # the consumer shuts down writing at once; the service keeps sending after
SERVICE_FIRST = 1    # the service sends all and shuts down first; the consumer keeps sending
TOGETHER = 2         # both send everything at once, then shut down writing
POOL = os.urandom(2 * MiB)


def pool_bytes(key, size):
    """A deterministic slice of POOL, different for each key."""
    offset = (key * 104729) % (len(POOL) - MAX_STREAM_BYTES)
    return memoryview(POOL)[offset:offset + size]


def fingerprint(data):
    return len(data), hashlib.sha256(data).hexdigest()


def read_fingerprint(conn):
    digest, count = hashlib.sha256(), 0
    while True:
        chunk = conn.recv(256 * KiB)
        if not chunk:
            return count, digest.hexdigest()
        digest.update(chunk)
        count += len(chunk)


def recv_exactly(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("EOF inside the stream header")
        data += chunk
    return data


class ScriptedService:
    """The pod-side service: the consumer's first bytes say how much to send and
    in which order to half-close; what arrived is kept as (length, sha256)."""

    def __init__(self):
        self.received = {}

    def handler(self, conn):
        index, up_len, down_len, mode = STREAM_HEADER.unpack(recv_exactly(conn, STREAM_HEADER.size))
        down = pool_bytes(2 * index + 1, down_len)
        if mode == SERVICE_FIRST:
            conn.sendall(down)
            conn.shutdown(socket.SHUT_WR)
            self.received[index] = read_fingerprint(conn)
        elif mode == CONSUMER_FIRST:
            conn.sendall(down[:down_len // 2])
            self.received[index] = read_fingerprint(conn)   # the consumer is done writing ...
            conn.sendall(down[down_len // 2:])              # ... this side goes on
            conn.shutdown(socket.SHUT_WR)
        else:
            sender = threading.Thread(target=send_and_shut, args=(conn, down), daemon=True)
            sender.start()
            self.received[index] = read_fingerprint(conn)
            sender.join(60)


def send_and_shut(conn, data):
    try:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the reading side reports the damage


def random_size(rng):
    """0 to MAX_STREAM_BYTES, with both ends 10 % likely each."""
    draw = rng.random()
    return 0 if draw < 0.1 else MAX_STREAM_BYTES if draw < 0.2 else rng.randint(1, MAX_STREAM_BYTES)


class PlannedStream:
    """The consumer side of one stream, driven by half_close_streams()."""

    def __init__(self, index, rng):
        self.index = index
        up_len, down_len = random_size(rng), random_size(rng)
        self.mode = rng.choice([CONSUMER_FIRST, SERVICE_FIRST, TOGETHER])
        up = pool_bytes(2 * index, up_len)
        self.expect_up = fingerprint(up)
        self.expect_down = fingerprint(pool_bytes(2 * index + 1, down_len))
        self.out = memoryview(STREAM_HEADER.pack(index, up_len, down_len, self.mode) + up)
        self.hold = STREAM_HEADER.size + up_len // 2 if self.mode == SERVICE_FIRST else None
        self.sent, self.shut, self.eof = 0, False, False
        self.digest, self.got = hashlib.sha256(), 0
        self.sock = None

    def connect(self, port):
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))

    def limit(self):
        """How far sending may go: SERVICE_FIRST waits for the service's EOF halfway."""
        return self.hold if self.hold is not None and not self.eof else len(self.out)

    def events(self):
        want_write = self.sent < self.limit() or (self.sent == len(self.out) and not self.shut)
        reading = 0 if self.eof else selectors.EVENT_READ
        return reading | (selectors.EVENT_WRITE if want_write else 0)

    def on_writable(self):
        if self.sent < self.limit():
            self.sent += self.sock.send(self.out[self.sent:self.limit()])
        if self.sent == len(self.out) and not self.shut:
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = True

    def on_readable(self):
        chunk = self.sock.recv(256 * KiB)
        if not chunk:
            self.eof = True
        self.digest.update(chunk)
        self.got += len(chunk)

    def done(self):
        return self.eof and self.shut


def half_close_streams(port, plans, concurrency, timeout=120.0):
    """Run the planned streams, `concurrency` at a time, in one selector loop.
    Returns {index: (length, sha256) received} and {index: error}."""
    selector = selectors.DefaultSelector()
    waiting, results, errors = list(reversed(plans)), {}, {}
    active, deadline = 0, time.monotonic() + timeout
    while waiting or active:
        assert time.monotonic() < deadline, "%d streams unfinished" % (len(waiting) + active)
        while waiting and active < concurrency:
            stream = waiting.pop()
            stream.connect(port)
            selector.register(stream.sock, stream.events(), stream)
            active += 1
        for key, mask in selector.select(1.0):
            stream = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    stream.on_writable()
                if mask & selectors.EVENT_READ:
                    stream.on_readable()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                errors[stream.index] = repr(exc)
            if stream.done() or stream.index in errors:
                selector.unregister(stream.sock)
                stream.sock.close()
                results[stream.index] = (stream.got, stream.digest.hexdigest())
                active -= 1
            else:
                selector.modify(stream.sock, stream.events(), stream)
    selector.close()
    return results, errors


@pytest.mark.slow
def test_faults_1000_streams_random_sizes_and_half_closes_byte_exact(server, workdir, pods,
                                                                    services):
    scripted = ScriptedService()
    service = services(scripted.handler)
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [service.port])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir, name="pod")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    plans = [PlannedStream(index, rng) for index in range(HALF_CLOSE_STREAMS)]
    started = time.monotonic()
    results, errors = half_close_streams(port, plans, HALF_CLOSE_CONCURRENCY)
    elapsed = time.monotonic() - started
    wait_until(lambda: len(scripted.received) >= len(plans) - len(errors), timeout=10,
               what="the service saw every stream end")
    wrong_down = [p.index for p in plans if results.get(p.index) != p.expect_down]
    wrong_up = [p.index for p in plans if scripted.received.get(p.index) != p.expect_up]
    total = sum(p.expect_up[0] + p.expect_down[0] for p in plans)
    modes = [sum(p.mode == m for p in plans) for m in (CONSUMER_FIRST, SERVICE_FIRST, TOGETHER)]
    print("\n%d streams (seed %d; consumer-first/service-first/together %s), %.1f MiB both ways "
          "in %.1f s: %d errors, %d wrong consumer->service, %d wrong service->consumer"
          % (len(plans), seed, modes, total / MiB, elapsed, len(errors), len(wrong_up),
             len(wrong_down)))
    assert not errors, list(errors.items())[:5]
    assert not wrong_up and not wrong_down, (seed, wrong_up[:10], wrong_down[:10])
    assert service.ends.count("eof") == len(plans), set(service.ends)
    assert pod.alive() and "Traceback" not in server.proc.stderr()


# ---- 7. SIGTERM with live streams: stop accepting, let streams finish, exit 0 ----------------

SERVER_GRACE_S = 3                 # --shutdown-grace of the server below (default 10)
POD_GRACE_S = 3                    # `start --stop-grace` of the pod below (default 10)
EXIT_SLACK_S = 1.5
PACED_CHUNK = 16 * KiB


def paced_handler(conn):
    """b"S": 20 chunks, one per 50 ms (about 1 s), then EOF; b"L": one per 50 ms for
    60 s (outlasts any grace). The bytes are pool_bytes(0, ...)."""
    kind = recv_exactly(conn, 1)
    chunks = 20 if kind == b"S" else 1200
    data = pool_bytes(0, PACED_CHUNK)
    for _ in range(chunks):
        conn.sendall(data)
        time.sleep(0.05)        # the pace of the service, not a wait for a condition
    conn.shutdown(socket.SHUT_WR)


class PacedStream:
    """A consumer of paced_handler, read in a thread: `result` is (bytes, sha256,
    how it ended, monotonic time of the end)."""

    def __init__(self, port, kind):
        self.sock = connect(port)
        self.sock.sendall(kind)
        self.sock.settimeout(5)
        self.first = self.sock.recv(PACED_CHUNK)        # the stream is live end to end
        self.result = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        digest, count, how = hashlib.sha256(self.first), len(self.first), "eof"
        self.sock.settimeout(90)
        try:
            while True:
                chunk = self.sock.recv(256 * KiB)
                if not chunk:
                    break
                digest.update(chunk)
                count += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except OSError as exc:
            how = "error %s" % exc
        self.result = (count, digest.hexdigest(), how, time.monotonic())
        self.sock.close()


def short_stream_expected():
    data = bytes(pool_bytes(0, PACED_CHUNK)) * 20
    return len(data), hashlib.sha256(data).hexdigest(), "eof"


def wait_exit(proc, timeout):
    """Wait for a process to exit by itself; returns (code, seconds)."""
    started = time.monotonic()
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("%s still running %.1f s after SIGTERM" % (proc.name, timeout))
    return code, time.monotonic() - started


@pytest.mark.slow
def test_faults_server_sigterm_refuses_new_lets_streams_finish_exits_0(workdir, pods, services):
    service = services(paced_handler)
    server = ServerHandle(workdir, extra=["--shutdown-grace", str(SERVER_GRACE_S)])
    try:
        pod_dir = os.path.join(workdir, "pod")
        setup_pod(server, pod_dir, "tcp", [service.port])
        port = public_ports(pod_dir)[0]
        pods(pod_dir, name="pod")
        short, long = PacedStream(port, b"S"), PacedStream(port, b"L")
        termed_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        listeners = (port, server.http, server.https, server.tunnel)
        wait_until(lambda: all(refused(p) for p in listeners), timeout=1.0,
                   what="every listener refusing new connections")
        check_graceful_stop("server", server.proc, SERVER_GRACE_S, termed_at,
                            time.monotonic() - termed_at, short, long)
    finally:
        if server.proc.alive():
            server.proc.stop(signal.SIGKILL)


def check_graceful_stop(what, proc, grace_s, termed_at, refused_after, short, long):
    """After SIGTERM at `termed_at` (new connections refused `refused_after`
    it): the ~1 s stream ended complete, the endless one was cut at the
    grace, and the process exited 0 within it, with no traceback."""
    code, took = wait_exit(proc, grace_s + EXIT_SLACK_S + 1)
    short.thread.join(5)
    long.thread.join(5)
    print("\n%s SIGTERM: new connections refused after %.3f s; ~1 s stream ended %s after "
          "%.2f s; endless stream ended %s after %.2f s; exit %d after %.2f s (grace %d s)"
          % (what, refused_after, short.result[2], short.result[3] - termed_at, long.result[2],
             long.result[3] - termed_at, code, took, grace_s))
    assert short.result[:3] == short_stream_expected()
    assert long.result[2] in ("eof", "reset")
    assert grace_s - 0.5 <= long.result[3] - termed_at <= grace_s + EXIT_SLACK_S
    assert code == 0 and took <= grace_s + EXIT_SLACK_S
    assert "Traceback" not in proc.stderr()


@pytest.mark.slow
def test_faults_pod_sigterm_refuses_new_lets_streams_finish_exits_0(server, workdir, pods,
                                                                   services):
    service = services(paced_handler)
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [service.port])
    port = public_ports(pod_dir)[0]
    pod = pods(pod_dir, "--stop-grace", str(POD_GRACE_S), name="pod")
    short, long = PacedStream(port, b"S"), PacedStream(port, b"L")
    seen = len(server.proc.stderr())
    termed_at = time.monotonic()
    os.kill(pod.pid, signal.SIGTERM)
    server.proc.wait_for(r"pod going away tunnel=", after=seen, timeout=2)
    with connect(port) as late:                     # new consumers are closed at once
        assert end_of(late, 1.0) in ("eof", "reset")
    check_graceful_stop("pod", pod, POD_GRACE_S, termed_at, time.monotonic() - termed_at,
                        short, long)


def pending_connection(listener):
    """True when a connection waits in the listener's backlog."""
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        return bool(selector.select(0))


@contextlib.contextmanager
def silent_server():
    """(listening socket, environment for a pod dialing it): a server that
    takes connections into its backlog and never answers them."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent, dict(os.environ, PIPE2ME_TUNNEL="127.0.0.1:%d" % silent.getsockname()[1])


@pytest.mark.slow
def test_faults_pod_sigterm_while_connecting_exits_0_at_once(server, workdir):
    """A pod whose server does not answer (the TLS handshake hangs) has nothing
    to drain: SIGTERM ends it at once, not after the handshake deadline."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [free_port()])
    with silent_server() as (silent, env):
        pod = Proc([sys.executable, POD, "--dir", pod_dir, "start"], workdir, "pod", env=env)
        try:
            wait_until(lambda: pending_connection(silent), timeout=10,
                       what="the pod's connection in the backlog")
            os.kill(pod.pid, signal.SIGTERM)
            code, took = wait_exit(pod, 12)
        finally:
            pod.stop(signal.SIGKILL)
    print("\npod SIGTERM during a hanging handshake: exit %d after %.2f s" % (code, took))
    assert code == 0 and took < EXIT_SLACK_S
    assert "Traceback" not in pod.stderr()


def test_faults_pod_gives_up_on_a_silent_server_after_its_hello_timeout(server, workdir):
    """A server that takes the connection and never answers: the pod gives up
    after `start --hello-timeout` seconds (here 1, default 10), to dial again."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [free_port()])
    with silent_server() as (silent, env):
        pod = Proc([sys.executable, POD, "--dir", pod_dir, "start", "--hello-timeout", "1"],
                   workdir, "pod", env=env)
        try:
            failed = pod.wait_for(r"(\S+ \S+) WARNING pipe2me.pod tunnel connect failed attempt=1 "
                                  r"retry_in=\S+ error=.*timed out", timeout=8)
        finally:
            assert stop_checked(pod) == 0
    ready = re.search(r"^(\S+ \S+) INFO pipe2me.pod pod ready", pod.stderr(), re.M)
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in (ready, failed)]
    took = (stamps[1] - stamps[0]).total_seconds()
    assert 1.0 <= took <= 3.0, took
