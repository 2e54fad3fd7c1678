#!/usr/bin/env python3
"""Attacks on memory and on shared capacity: what the server holds, and
whether others are still served.

    python3 bench/attacks.py                    # this checkout, about two minutes
    python3 bench/attacks.py --repo /tmp/base   # another checkout, same conditions
    python3 bench/attacks.py --consumers 200 --flood-mib 256

For each case below it starts a pipe2me server (defaults apart from free
ports on 127.0.0.1 and a temporary STATE_DIR), two tunnels and one real pod
(`start`) whose service pushes 8 MiB to every connection, then measures the
server's RSS:

  (a) a pod with a valid certificate sends PING frames of 256 KiB and
      WINDOW frames (up to --flood-mib, for at most 10 s) and never reads;
      an OPEN from a pod is a protocol error, so that flood ends at once;
  (b) --consumers consumers connect to the pushing tunnel, ask, never read;
  (c) both at once;

each as the peak while it runs and the value 5 s after the attackers left,
next to the idle value. Then fairness, from 127.0.0.8 as the attacker:

  (d) 200 silent connections to TUNNEL_PORT: seconds until a pod with a
      valid certificate from 127.0.0.1 is WELCOMEd;
  (e) 100 API requests that announce a body and never send it: seconds
      until `GET /config` from 127.0.0.2 is answered.

Target: (a)-(c) within MAX_BUFFERED_BYTES plus a fixed overhead, and back
within a few MiB of idle; (d) and (e) within 1 s (a try that takes 5 s
counts as failed); (d) and (e) run on the server of case (c). Stdlib only;
exit codes: 0 measured and on target, 1 not, 2 usage.
"""
import argparse
import json
import os
import re
import resource
import selectors
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

DOMAIN = "pipe2.localhost"
TOKEN = "attacks-bench-token"
FRAME = struct.Struct("!BII")
HELLO, WELCOME, WINDOW, PING = 1, 2, 6, 9
MiB = 1 << 20
ATTACKER = "127.0.0.8"
PUSH_BYTES = 8 * MiB
TRY_TIMEOUT_S = 5.0
HOLD_S = 15.0           # how long each memory attack runs before the attackers leave


# ---- processes -----------------------------------------------------------------------

def push_service(port_file):
    """--push-service: accept anything, send PUSH_BYTES to every connection
    as fast as it takes them (one selector, no thread per connection)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    with open(port_file, "w") as fh:
        fh.write(str(listener.getsockname()[1]))
    selector, chunk, left = selectors.DefaultSelector(), b"d" * 65536, {}
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                left[conn] = PUSH_BYTES
                selector.register(conn, selectors.EVENT_WRITE)
                continue
            conn = key.fileobj
            try:
                left[conn] -= conn.send(chunk[:left[conn]])
            except BlockingIOError:
                continue
            except OSError:
                left[conn] = 0
            if left[conn] <= 0:
                selector.unregister(conn)
                conn.close()
                del left[conn]


def start(argv, workdir, name, env=None):
    err = open(os.path.join(workdir, name + ".err"), "w+b")
    out = open(os.path.join(workdir, name + ".out"), "w+b")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    proc.err, proc.out = err, out
    return proc


def wait_for(proc, pattern, stream="err", timeout_s=60):
    handle = getattr(proc, stream)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handle.seek(0)
        found = re.search(pattern.encode(), handle.read())
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    handle.seek(0)
    raise SystemExit("no %r from pid %d:\n%s" % (pattern, proc.pid, handle.read()[-2000:].decode()))


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rss(pid):
    with open("/proc/%d/status" % pid) as fh:
        return int(re.search(r"VmRSS:\s+(\d+) kB", fh.read()).group(1)) * 1024


class Bed:
    """The server, the tunnels (one with a pod whose service pushes), their files."""

    def __init__(self, repo, workdir):
        self.repo, self.workdir, self.procs = repo, workdir, []
        state = os.path.join(workdir, "state")
        os.makedirs(state, mode=0o700)
        with open(os.path.join(state, "tokens.conf"), "w") as fh:
            fh.write("%s = max_ports:4 lifespan:1h\n" % TOKEN)
        self.env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "LANG")}
        self.env["HOME"] = workdir
        self.server = self.spawn([sys.executable, os.path.join(repo, "pipe2me_server.py"),
                                  "--state-dir", state, "--listen-address", "127.0.0.1",
                                  "--http-port", "0", "--https-port", "0", "--tunnel-port", "0",
                                  "--tunnel-ports", "41100...41110"], "server")
        ready = wait_for(self.server, r"ready http=[\d.]+:(\d+) https=[\d.]+:(\d+) tunnel=[\d.]+:(\d+)")
        self.http, self.https, self.tunnel = (int(p) for p in ready.groups())
        port_file = os.path.join(workdir, "push.port")
        self.pusher = self.spawn([sys.executable, os.path.abspath(__file__), "--push-service",
                                  port_file], "push-service")
        while not os.path.exists(port_file) or not open(port_file).read():
            time.sleep(0.05)
        self.push_port = int(open(port_file).read())
        self.raw_dir, self.raw_port = self.setup_pod("raw", self.push_port)
        self.push_dir, self.public_port = self.setup_pod("push", self.push_port)
        self.pod = self.spawn([sys.executable, os.path.join(repo, "pipe2me_pod.py"), "--dir",
                               self.push_dir, "start"], "pod")
        wait_for(self.pod, r"tunnel up")

    def spawn(self, argv, name):
        proc = start(argv, self.workdir, name, self.env)
        self.procs.append(proc)
        return proc

    def setup_pod(self, name, local_port):
        directory = os.path.join(self.workdir, name)
        os.makedirs(directory)
        pod = [sys.executable, os.path.join(self.repo, "pipe2me_pod.py"), "--dir", directory]
        subprocess.run(pod + ["setup", "--server", "http://127.0.0.1:%d" % self.http, "--auth",
                              TOKEN, "--protocols", "tcp", "--local-ports", str(local_port)],
                       check=True, capture_output=True, timeout=120, env=self.env)
        env = subprocess.run(pod + ["env"], check=True, capture_output=True, text=True,
                             env=self.env).stdout
        values = dict(re.findall(r"^(?:export )?(\w+)=(.*)$", env, re.M))
        port = int(shlex.split(values["PIPE2ME_URLS_0"])[0].rsplit(":", 1)[1])
        return directory, port

    def close(self):
        for proc in reversed(self.procs):
            stop(proc)


# ---- attackers -------------------------------------------------------------------------

def raw_pod(bed, source="127.0.0.1", rcvbuf=None):
    """A TLS connection with the `raw` tunnel's certificate, greeted; (socket, seconds)."""
    started = time.monotonic()
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(TRY_TIMEOUT_S)
    sock.connect(("127.0.0.1", bed.tunnel))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(bed.raw_dir, "pipe2me.cacert"))
    context.load_cert_chain(os.path.join(bed.raw_dir, "pipe2me.openssl.cert"),
                            os.path.join(bed.raw_dir, "pipe2me.openssl.priv"))
    tls = context.wrap_socket(sock, server_hostname=DOMAIN)
    info = open(os.path.join(bed.raw_dir, "pipe2me.info.inc")).read()
    tunnel_id = shlex.split(re.search(r"^PIPE2ME_ID=(.*)$", info, re.M).group(1))[0]
    hello = json.dumps({"kind": "control", "version": 1, "tunnel": tunnel_id}).encode()
    tls.sendall(FRAME.pack(HELLO, 0, len(hello)) + hello)
    header = tls.recv(FRAME.size)
    if len(header) < FRAME.size or header[0] != WELCOME:
        raise OSError("not welcomed")
    return tls, time.monotonic() - started


class Flood(threading.Thread):
    """(a): PINGs of 256 KiB and WINDOW frames from a pod that never reads."""

    def __init__(self, bed, limit_bytes, within_s=HOLD_S):
        super().__init__(daemon=True)
        self.sock, _ = raw_pod(bed, rcvbuf=4096)
        self.limit, self.within_s, self.sent = limit_bytes, within_s, 0
        self.consumer = socket.create_connection(("127.0.0.1", bed.raw_port))  # stream 1
        time.sleep(0.5)  # its OPEN has reached the server's session before any WINDOW
        self.start()

    def run(self):
        ping = FRAME.pack(PING, 0, 256 * 1024) + b"p" * (256 * 1024)
        window = FRAME.pack(WINDOW, 1, 4) + b"\0\0\0\0"
        burst = ping + window * 512
        end = time.monotonic() + self.within_s
        try:
            while self.sent < self.limit and time.monotonic() < end:
                self.sock.sendall(burst)
                self.sent += len(burst)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        self.consumer.close()


def lazy_consumers(port, count):
    """(b): consumers that ask for the download and never read."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    return socks


def watch_peak(pid, seconds):
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss(pid))
        time.sleep(0.1)
    return peak


def memory_case(bed, name, flood_mib, consumers):
    idle = rss(bed.server.pid)
    flood = Flood(bed, flood_mib * MiB) if flood_mib else None
    crowd = lazy_consumers(bed.public_port, consumers) if consumers else []
    peak = watch_peak(bed.server.pid, HOLD_S)
    if flood:
        flood.join(15)
        peak = max(peak, watch_peak(bed.server.pid, 1.0))
    sent = flood.sent if flood else 0
    for sock in crowd:
        sock.close()
    if flood:
        flood.close()
    time.sleep(5.0)
    after = rss(bed.server.pid)
    return {"case": name, "idle": idle, "peak": peak, "after": after, "flood_sent": sent,
            "consumers": len(crowd), "server_alive": bed.server.poll() is None}


def hold(port, count, first=b""):
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((ATTACKER, 0))
        try:
            sock.connect(("127.0.0.1", port))
            if first:
                sock.sendall(first)
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    return socks


def api_try(bed):
    started = time.monotonic()
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(TRY_TIMEOUT_S)
            sock.connect(("127.0.0.1", bed.http))
            sock.sendall(b"GET /config HTTP/1.0\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n")
            answer = sock.recv(12)
    except OSError:
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.0 200") else None


def pod_try(bed):
    try:
        sock, seconds = raw_pod(bed)
    except OSError:
        return None
    sock.close()
    return seconds


def fairness(bed, tries):
    rows = []
    held = hold(bed.tunnel, 200)
    time.sleep(1.0)
    rows.append(("(d) pod, 200 silent connections to TUNNEL_PORT from one address",
                 [pod_try(bed) for _ in range(tries)]))
    for sock in held:
        sock.close()
    head = ("POST /tunnels HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000\r\n\r\n{" % DOMAIN).encode()
    held = hold(bed.http, 100, head)
    time.sleep(1.0)
    rows.append(("(e) API, 100 bodies that never come from one address",
                 [api_try(bed) for _ in range(tries)]))
    for sock in held:
        sock.close()
    return rows


# ---- report -----------------------------------------------------------------------------

def render(repo, memory, rows, consumers):
    print("%s (loaded machine: compare only runs made back to back)" % repo)
    print()
    print("| case | server RSS idle MiB | peak MiB | 5 s after MiB | flood sent MiB | consumers | alive |")
    print("|---|---|---|---|---|---|---|")
    for m in memory:
        print("| %s | %.1f | %.1f (+%.1f) | %.1f (+%.1f) | %.0f | %d | %s |" % (
            m["case"], m["idle"] / MiB, m["peak"] / MiB, (m["peak"] - m["idle"]) / MiB,
            m["after"] / MiB, (m["after"] - m["idle"]) / MiB, m["flood_sent"] / MiB,
            m["consumers"], "yes" if m["server_alive"] else "NO"))
    print()
    print("| fairness | served | p50 s | max s | within 1 s |")
    print("|---|---|---|---|---|")
    failed = False
    for name, times in rows:
        served = sorted(t for t in times if t is not None)
        ok = len(served) == len(times) and served[-1] < 1.0
        failed |= not ok
        print("| %s | %d/%d | %s | %s | %s |" % (
            name, len(served), len(times), "%.3f" % served[len(served) // 2] if served else "-",
            "%.3f" % served[-1] if served else "-", "yes" if ok else "no"))
    return 1 if failed or not all(m["server_alive"] for m in memory) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--consumers", type=int, default=1000)
    parser.add_argument("--flood-mib", type=int, default=1024)
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--push-service", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.push_service:
        return push_service(args.push_service)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    repo = os.path.abspath(args.repo)
    memory, rows = [], []
    cases = (("(a) flooding pod", args.flood_mib, 0),
             ("(b) %d lazy consumers" % args.consumers, 0, args.consumers),
             ("(c) both", args.flood_mib, args.consumers))
    for index, (name, flood, consumers) in enumerate(cases):
        # a fresh server for each case: freed memory one case left behind
        # (and not returned to the system) would hide the next case's growth
        with tempfile.TemporaryDirectory(prefix="pipe2me-attacks-") as workdir:
            bed = Bed(repo, workdir)
            try:
                memory.append(memory_case(bed, name, flood, consumers))
                if index == len(cases) - 1 and bed.server.poll() is None:
                    rows = fairness(bed, args.tries)
            finally:
                bed.close()
    return render(repo, memory, rows, args.consumers)


if __name__ == "__main__":
    sys.exit(main())
