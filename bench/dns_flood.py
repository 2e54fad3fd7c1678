#!/usr/bin/env python3
"""DNS under attack: does the built-in DNS slow the relay, and does one
source keep others from DNS over TCP?

    python3 bench/dns_flood.py                    # this checkout, about a minute
    python3 bench/dns_flood.py --repo /work/base  # another checkout, same conditions
    python3 bench/dns_flood.py --seconds 5 --round-trips 500

Starts the echo service, a pipe2me server with DNS_PORT and the builtin
provider, and a pod with one tcp tunnel (bench/peers.py), all on 127.0.0.1,
then measures:

1. tunnel round trip (64 bytes, one open stream; bench/loadgen.py) p50 and
   p99, idle, then while one process floods DNS_PORT with UDP queries as
   fast as it can send (it never reads the answers); target: p50 under the
   flood within 2x of idle. For scale, the same flood aimed at a UDP socket
   nobody reads (what the flood alone costs this machine), and the server's
   CPU use during the DNS flood;
2. TCP slot fairness: while one process holds 200 slow TCP connections to
   DNS_PORT from 127.0.0.1 (one byte every second, reconnecting when
   dropped), `dig +tcp` from 127.0.0.2 asks for the SOA ten times; target:
   every answer within 1 s.

Stdlib only (plus `dig`). The flood and the slow clients are this script
run with --flood-udp / --hoard-tcp, each its own process, stopped by PID.
Exit codes: 0 measured (targets met or not: see the table), 1 something
failed, 2 usage.
"""
import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadgen  # noqa: E402
import peers  # noqa: E402
from report import percentile  # noqa: E402

HOARD_CONNECTIONS = 200
DIG_TRIES = 10


def query(name, qid):
    """A DNS query for the A record of `name`."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def flood_udp(port, name):
    """--flood-udp: send queries as fast as the socket takes them until SIGTERM;
    print how many were sent and for how long."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    packets = [query(name, qid) for qid in range(4096)]
    sent, started = 0, time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            try:
                sock.send(packets[sent & 4095])
                sent += 1
            except OSError:
                pass  # ENOBUFS / ECONNREFUSED from an earlier answer: keep going
    finally:
        print("sent %d in %.1f s" % (sent, time.monotonic() - started), flush=True)


def hoard_tcp(port, count):
    """--hoard-tcp: keep `count` connections from 127.0.0.1 that send one byte
    a second and never finish a query; reconnect those the server drops."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    held = []
    while True:
        while len(held) < count:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            sock.connect_ex(("127.0.0.1", port))
            held.append(sock)
        time.sleep(1.0)
        for sock in list(held):
            try:
                sock.send(b"\0")
            except OSError:
                sock.close()
                held.remove(sock)


def dig_tcp(port, name):
    """Seconds dig +tcp from 127.0.0.2 took to get an answer, or None."""
    started = time.monotonic()
    done = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "-b", "127.0.0.2", "+tcp",
                           "+norec", "+time=1", "+tries=1", name, "SOA"],
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    return took if "status: NOERROR" in done.stdout else None


def round_trip_figures(port, count):
    samples = loadgen.round_trips(port, count)
    return percentile(samples, 0.5) / 1000.0, percentile(samples, 0.99) / 1000.0


def helper(group, name, *args):
    return group.start(name, [sys.executable, os.path.abspath(__file__)] + list(args))


def flooded_round_trips(args, group, path, port, name):
    """(p50, p99) while one process floods `port`, the flood's rate, and the
    server's CPU use in that time (share of one core)."""
    flood = helper(group, "flood-%d" % port, "--flood-udp", str(port), name)
    time.sleep(args.seconds / 5)  # let the flood reach its pace
    cpu, started = peers.cpu_seconds(path.server.tree()), time.monotonic()
    figures = round_trip_figures(path.port, args.round_trips)
    cpu = (peers.cpu_seconds(path.server.tree()) - cpu) / (time.monotonic() - started)
    group.stop(flood)
    return figures, flood.output("out").strip(), cpu


def measure(args, group, work_dir):
    """The figures, as a dict."""
    _service, service_port = peers.start_service(group)
    dns_port = peers.free_port()
    os.environ.update(DNS_PORT=str(dns_port), DYNAMIC_DNS_SERVICE="builtin")
    try:
        path = peers.Pipe2mePath(group, work_dir, service_port)
    finally:
        del os.environ["DNS_PORT"], os.environ["DYNAMIC_DNS_SERVICE"]
    domain = "pipe2.localhost"
    figures = {}
    figures["idle"] = round_trip_figures(path.port, args.round_trips)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        figures["sink"], _rate, _cpu = flooded_round_trips(
            args, group, path, sink.getsockname()[1], domain)
    figures["flood"], figures["flood_rate"], figures["cpu"] = flooded_round_trips(
        args, group, path, dns_port, domain)
    path.check_alive()
    hoard = helper(group, "hoard", "--hoard-tcp", str(dns_port), str(HOARD_CONNECTIONS))
    time.sleep(2.0)  # every connection made, and the first bytes sent
    figures["dig"] = [dig_tcp(dns_port, domain) for _ in range(DIG_TRIES)]
    group.stop(hoard)
    path.check_alive()
    return figures


def render(figures, repo):
    idle, flood = figures["idle"], figures["flood"]
    answered = [t for t in figures["dig"] if t is not None]
    ratio = flood[0] / idle[0]
    lines = [
        "DNS under attack, %s (%s)" % (repo, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        "",
        "| figure | value | target |",
        "|---|---|---|",
        "| tunnel round trip p50 / p99, idle | %.0f / %.0f µs | |" % idle,
        "| tunnel round trip p50 / p99, one-process UDP flood on DNS_PORT | %.0f / %.0f µs |"
        " |" % flood,
        "| p50 under flood / idle | %.2fx | within 2x: %s |" % (ratio, "met" if ratio <= 2 else "MISSED"),
        "| flood sent | %s | |" % figures["flood_rate"],
        "| server CPU during the flood | %.0f %% of a core | |" % (100 * figures["cpu"]),
        "| for scale: round trip p50 / p99, the same flood at a socket nobody reads |"
        " %.0f / %.0f µs | |" % figures["sink"],
        "| dig +tcp from 127.0.0.2 with %d slow TCP connections from 127.0.0.1: answered |"
        " %d of %d, slowest %s | all within 1 s: %s |" % (
            HOARD_CONNECTIONS, len(answered), DIG_TRIES,
            "%.3f s" % max(answered) if answered else "n/a",
            "met" if len(answered) == DIG_TRIES and max(answered) < 1.0 else "MISSED"),
    ]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=peers.REPO_DIR,
                        help="checkout whose pipe2me_server.py and pipe2me_pod.py to run")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0, help="flood warm-up is a fifth")
    parser.add_argument("--flood-udp", nargs=2, metavar=("PORT", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--hoard-tcp", nargs=2, type=int, metavar=("PORT", "COUNT"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.flood_udp:
        return flood_udp(int(args.flood_udp[0]), args.flood_udp[1])
    if args.hoard_tcp:
        return hoard_tcp(*args.hoard_tcp)
    repo = os.path.abspath(args.repo)
    peers.SERVER_SCRIPT = os.path.join(repo, "pipe2me_server.py")
    peers.POD_SCRIPT = os.path.join(repo, "pipe2me_pod.py")
    with tempfile.TemporaryDirectory(prefix="pipe2me-dns-bench-") as work_dir:
        group = peers.ProcessGroup(work_dir)
        try:
            figures = measure(args, group, work_dir)
        except (peers.BenchError, loadgen.LoadError, OSError) as exc:
            print("dns_flood: %s" % exc, file=sys.stderr)
            return 1
        finally:
            group.stop_all()
    print(render(figures, repo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
