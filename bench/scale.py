#!/usr/bin/env python3
"""How one pipe2me server behaves as it fills up (issue 14).

Usage:
    python3 bench/scale.py                       # 10,000 tunnels, no pods
    python3 bench/scale.py --pods 1000 --streams 5000
    python3 bench/scale.py --tunnels 3000 --server /path/to/other/pipe2me_server.py
    python3 bench/scale.py --pods 300 --server /work/base/pipe2me_server.py \
        --pod /work/base/pipe2me_pod.py        # another copy's pair

Phases, each printed as it finishes (and the whole as Markdown at the end):
1. fill: POST /tunnels (one token, `tcp`, one client, sequential) until
   --tunnels exist; server CPU per creation (utime+stime from
   /proc/<pid>/stat) and creations/s per block of --block;
2. one /metrics scrape: its server CPU, wall time and size;
3. restart to ready: SIGTERM, start again, time until the "ready" line;
4. with --pods N: N pod processes (`setup` then `start`, one shared echo
   service), --streams idle echo streams spread over them; server RSS
   before and after the streams (RSS per idle stream), idle server CPU over
   --idle-s, every stream still echoing after the idle time, then SIGKILL of
   the server, a restart, and the time until every pod is connected again
   (read from /metrics); server descriptors against the hard limit.

Stdlib only; everything on 127.0.0.1 in one temporary directory, removed at
the end unless --keep-temp. Not a test: figures depend on the machine.
"""
import argparse
import concurrent.futures
import json
import os
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

TOKEN = "bench@scale-token"


# =====================================================================
# SERVER — started from any copy of pipe2me_server.py
# =====================================================================

class BenchServer:
    """A pipe2me server on loopback with its own state dir and port range."""

    def __init__(self, group, script, work_dir, port_count, first_port):
        self.group, self.script = group, script
        self.state_dir = os.path.join(work_dir, "server")
        os.makedirs(self.state_dir, mode=0o700)
        with open(os.path.join(self.state_dir, "tokens.conf"), "w") as f:
            f.write("%s = max_ports:1 lifespan:30d\n" % TOKEN)
        os.chmod(os.path.join(self.state_dir, "tokens.conf"), 0o600)
        self.ports = (first_port, first_port + port_count)
        self.http_port, self.https_port, self.tunnel_port = (
            peers.free_port(), peers.free_port(), peers.free_port())
        self.proc = None
        self.starts = 0

    def start(self):
        """Start and wait for "ready"; returns seconds to ready."""
        self.starts += 1
        began = time.monotonic()
        self.proc = self.group.start("server-%d" % self.starts, [
            sys.executable, self.script, "--state-dir", self.state_dir,
            "--listen-address", "127.0.0.1", "--http-port", str(self.http_port),
            "--https-port", str(self.https_port), "--tunnel-port", str(self.tunnel_port),
            "--tunnel-ports", "%d...%d" % self.ports, "--max-tunnels-per-token", "0"])
        wait_ready(self.proc)
        return time.monotonic() - began

    def stop(self, sig=signal.SIGTERM):
        if sig == signal.SIGKILL:
            self.proc.popen.kill()
            self.proc.popen.wait(10)
        self.group.stop(self.proc)

    def cpu(self):
        return peers.cpu_seconds([self.proc.pid])

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.http_port, path)

    def create_tunnel(self, attempts=20):
        """POST /tunnels; a 503 or 429 (a busy shared machine) is tried again."""
        body = json.dumps({"token": TOKEN, "protocols": ["tcp"]}).encode()
        for attempt in range(attempts):
            request = urllib.request.Request(self.url("/tunnels"), data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in (429, 503) or attempt == attempts - 1:
                    raise peers.BenchError("POST /tunnels: %s %s" % (exc.code, exc.read()[:200]))
                time.sleep(0.2)

    def metrics(self):
        with urllib.request.urlopen(self.url("/metrics"), timeout=60) as answer:
            return answer.read()


def wait_ready(proc, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(r"\bready\b", proc.output("err")):
            return
        if not proc.alive():
            raise peers.BenchError("server exited: %s" % proc.tail())
        time.sleep(0.005)
    raise peers.BenchError("server not ready within %.0f s: %s" % (timeout_s, proc.tail()))


def metric(text, name):
    match = re.search(r"^%s (\d+)" % re.escape(name), text, re.M)
    return int(match.group(1)) if match else None


# =====================================================================
# PHASES
# =====================================================================

def fill(server, count, block, report):
    """Create `count` tunnels; one row per block."""
    rows = []
    for start in range(0, count, block):
        cpu0, wall0 = server.cpu(), time.monotonic()
        for _ in range(min(block, count - start)):
            server.create_tunnel()
        made = min(block, count - start)
        cpu_ms = (server.cpu() - cpu0) * 1000 / made
        rate = made / (time.monotonic() - wall0)
        rows.append((start, start + made, cpu_ms, rate))
        report("| %s–%s | %.1f ms | %.0f |" % (f"{start:,}", f"{start + made:,}", cpu_ms, rate))
    return rows


def scrape(server, report):
    cpu0, wall0 = server.cpu(), time.monotonic()
    body = server.metrics()
    wall, cpu = time.monotonic() - wall0, server.cpu() - cpu0
    lines = body.count(b"\n")
    report("metrics scrape: %.0f ms server CPU, %.0f ms wall, %d bytes, %d lines"
           % (cpu * 1000, wall * 1000, len(body), lines))
    return {"cpu_ms": cpu * 1000, "wall_ms": wall * 1000, "bytes": len(body), "lines": lines}


def setup_pods(group, server, work_dir, count, service_port, report):
    """`setup` N pod dirs (4 at a time), then `start` each; returns the processes."""
    dirs = [os.path.join(work_dir, "pod-%04d" % i) for i in range(count)]

    def setup(path):
        os.makedirs(path)
        peers.run_command([sys.executable, peers.POD_SCRIPT, "--dir", path, "setup",
                           "--server", server.url(""), "--auth", TOKEN, "--protocols", "tcp",
                           "--local-ports", str(service_port)], timeout_s=300)
        with open(os.path.join(path, "pipe2me.info.inc")) as f:
            env = peers.parse_env(f.read())
        return int(env["PIPE2ME_URLS_0"].rsplit(":", 1)[1])

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ports = list(pool.map(setup, dirs))
    report("pod setups: %d in %.1f s" % (count, time.monotonic() - began))
    pods = [group.start("pod-%04d" % i, [sys.executable, peers.POD_SCRIPT, "--dir", d, "-q",
                                         "start"]) for i, d in enumerate(dirs)]
    return pods, ports


def wait_pods(server, count, timeout_s):
    """Seconds until `count` pods are connected: first seen in this server
    process's log (cheap to poll), then confirmed by /metrics (a scrape costs
    the server, so at most twice a second). BenchError after timeout_s."""
    began, shown = time.monotonic(), 0
    while time.monotonic() - began < timeout_s:
        connected = set(re.findall(r"pod connected tunnel=(\w+)", server.proc.output("err")))
        if len(connected) >= count:
            shown = metric(server.metrics().decode(), "pipe2me_pods_connected") or 0
            if shown >= count:
                return time.monotonic() - began
            time.sleep(0.4)
        time.sleep(0.1)
    raise peers.BenchError("%d of %d pods connected after %.0f s" % (shown, count, timeout_s))


def open_streams(ports, count):
    """`count` echo streams spread over the pods' public ports, each proven to echo."""
    socks = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=30)
        sock.sendall(b"E")
        socks.append(sock)
    for sock in socks:
        if recv_exactly(sock, 1) != b"E":
            raise peers.BenchError("a stream did not echo")
    return socks


def recv_exactly(sock, size):
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return got


def still_echoing(socks):
    for sock in socks:
        sock.sendall(b"x")
    return sum(recv_exactly(sock, 1) == b"x" for sock in socks)


def pods_phase(group, server, work_dir, args, report):
    """Pods connected, idle streams, idle CPU, reconnect after SIGKILL."""
    _service, service_port = peers.start_service(group)
    pods, ports = setup_pods(group, server, work_dir, args.pods, service_port, report)
    report("pods back after start: %.1f s" % wait_pods(server, args.pods, 300))
    rss_pods = peers.memory_bytes([server.proc.pid])[0]
    socks = open_streams(ports, args.streams)
    time.sleep(1.0)  # let the pods' first window updates settle before reading RSS
    rss_streams = peers.memory_bytes([server.proc.pid])[0]
    per_stream = (rss_streams - rss_pods) / max(1, args.streams)
    fds = peers.fd_count([server.proc.pid])
    report("server RSS: %.1f MiB with %d pods, %.1f MiB with %d streams (%.2f KiB per stream)"
           % (rss_pods / 2**20, args.pods, rss_streams / 2**20, args.streams, per_stream / 1024))
    report("server fds: %d of hard limit %d" % (fds, fd_hard_limit(server.proc.pid)))
    cpu0 = server.cpu()
    time.sleep(args.idle_s)
    idle = (server.cpu() - cpu0) / args.idle_s * 100
    report("idle server CPU: %.1f %% of one core over %.0f s" % (idle, args.idle_s))
    echoed = still_echoing(socks)
    report("streams echoing after idle: %d of %d" % (echoed, len(socks)))
    for sock in socks:
        sock.close()
    server.stop(signal.SIGKILL)
    ready = server.start()
    back = wait_pods(server, args.pods, 300)
    report("after SIGKILL: restart to ready %.2f s, all %d pods back %.1f s after ready"
           % (ready, args.pods, back))
    for pod in pods:
        group.stop(pod)


def fd_hard_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", f.read(), re.M)
    return int(match.group(2)) if match else -1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=peers.SERVER_SCRIPT, help="pipe2me_server.py to run")
    parser.add_argument("--pod", default=peers.POD_SCRIPT,
                        help="pipe2me_pod.py to run (default: this tree's, whatever the server)")
    parser.add_argument("--tunnels", type=int, default=10000)
    parser.add_argument("--block", type=int, default=500)
    parser.add_argument("--pods", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--first-port", type=int, default=20500)
    parser.add_argument("--keep-temp", action="store_true")
    args = parser.parse_args(argv)
    peers.POD_SCRIPT = os.path.abspath(args.pod)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work_dir = tempfile.mkdtemp(prefix="pipe2me-scale-")
    group = peers.ProcessGroup(work_dir)
    lines = []

    def report(line):
        print(line, flush=True)
        lines.append(line)

    try:
        server = BenchServer(group, args.server, work_dir, args.tunnels + args.pods + 50,
                             args.first_port)
        report("server %s, pod %s, ready in %.2f s (empty)"
               % (args.server, peers.POD_SCRIPT, server.start()))
        report("| tunnels already there | server CPU per creation | creations/s |")
        report("|---|---|---|")
        fill(server, args.tunnels, args.block, report)
        scrape(server, report)
        server.stop()
        report("restart to ready with %d tunnel files: %.2f s" % (args.tunnels, server.start()))
        if args.pods:
            pods_phase(group, server, work_dir, args, report)
    except (peers.BenchError, OSError) as exc:
        report("failed: %s" % exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        group.stop_all()
        if args.keep_temp:
            print("kept %s" % work_dir, file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
