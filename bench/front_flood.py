#!/usr/bin/env python3
"""Front fairness: does one source holding idle connections keep others
from the HTTP and HTTPS fronts?

    python3 bench/front_flood.py                    # this checkout, under a minute
    python3 bench/front_flood.py --repo /work/base  # another checkout, same conditions
    python3 bench/front_flood.py --connections 1200 --tries 10

Starts a pipe2me server (default settings apart from free ports on
127.0.0.1 and a temporary STATE_DIR), then one process that holds
`--connections` idle connections from 127.0.0.1 to each front (never
sending a byte, reconnecting those the server drops), and measures from
127.0.0.2 `--tries` times per front the time to an answer of
`GET /config` on the bare domain (over TLS on the HTTPS front). Target:
every answer within 1 s. A try without an answer within 5 s counts as
failed. Stdlib only; exit codes: 0 measured, 1 something failed, 2 usage.
"""
import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

DOMAIN = "pipe2.localhost"
TRY_TIMEOUT_S = 5.0


def hold(ports, count):
    """--hold: keep `count` idle connections from 127.0.0.1 to each port."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    held = {port: [] for port in ports}
    print("holding", flush=True)
    while True:
        for port, socks in held.items():
            for sock in list(socks):  # the server closed it: EOF or reset is readable
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) in (b"",):
                        socks.remove(sock)
                        sock.close()
                except BlockingIOError:
                    pass
                except OSError:
                    socks.remove(sock)
                    sock.close()
            while len(socks) < count:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                try:
                    sock.connect(("127.0.0.1", port))
                except OSError:
                    sock.close()
                    break
                socks.append(sock)
        time.sleep(0.2)


def one_try(port, tls):
    """Seconds until 127.0.0.2 got an HTTP answer from the front, or None
    (the client's TLS context is made before the clock starts)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if tls else None
    if context is not None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    started = time.monotonic()
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(TRY_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        if tls:
            sock = context.wrap_socket(sock, server_hostname=DOMAIN)
        with sock:
            sock.sendall(b"GET /config HTTP/1.0\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n")
            answer = sock.recv(12)
    except OSError:
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.") else None


def start_server(repo, workdir):
    argv = [sys.executable, os.path.join(repo, "pipe2me_server.py"), "--state-dir",
            os.path.join(workdir, "state"), "--listen-address", "127.0.0.1",
            "--http-port", "0", "--https-port", "0", "--tunnel-port", "0",
            "--tunnel-ports", "41000...41010"]
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "LANG")}
    env["HOME"] = workdir
    err = open(os.path.join(workdir, "server.err"), "w+b")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        err.seek(0)
        ready = re.search(rb"ready http=[\d.]+:(\d+) https=[\d.]+:(\d+)", err.read())
        if ready:
            return proc, int(ready.group(1)), int(ready.group(2))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start:\n" + open(err.name).read()[-2000:])


def measure(repo, connections, tries):
    with tempfile.TemporaryDirectory(prefix="pipe2me-front-flood-") as workdir:
        server, http_port, https_port = start_server(repo, workdir)
        holder = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold",
                                   "%d,%d" % (http_port, https_port), "--connections",
                                   str(connections)], stdout=subprocess.PIPE)
        try:
            holder.stdout.readline()
            time.sleep(2.0)  # let the holder fill (and refill) its connections
            rows = []
            for name, port, tls in (("HTTP front", http_port, False),
                                    ("HTTPS front", https_port, True)):
                times = [one_try(port, tls) for _ in range(tries)]
                served = sorted(t for t in times if t is not None)
                rows.append((name, len(served), served))
        finally:
            holder.send_signal(signal.SIGTERM)
            holder.wait(10)
            server.send_signal(signal.SIGTERM)
            server.wait(20)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--connections", type=int, default=1200)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--hold", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:
        return hold([int(p) for p in args.hold.split(",")], args.connections)
    rows = measure(os.path.abspath(args.repo), args.connections, args.tries)
    print("%s: %d idle connections from 127.0.0.1 to each front; %d tries from 127.0.0.2"
          % (args.repo, args.connections, args.tries))
    print("| front | served | p50 s | max s | within 1 s |")
    print("|---|---|---|---|---|")
    for name, count, served in rows:
        p50 = "%.3f" % served[len(served) // 2] if served else "-"
        worst = "%.3f" % served[-1] if served else "-"
        ok = count == args.tries and served[-1] < 1.0
        print("| %s | %d/%d | %s | %s | %s |" % (name, count, args.tries, p50, worst,
                                                 "yes" if ok else "no"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
