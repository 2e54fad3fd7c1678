"""The fronts (issue 12 points 1, 3, 4; issue 11's front findings): the HTTP
front as a reverse proxy that routes every request by its own Host, the
forwarding headers, honest 502/503/504 pages, the refusal of cleartext
HTTP/2, the pending budgets with a per-source share, and the SNI front
reading a ClientHello split over several records.

Real parts on 127.0.0.0/8: the server and pods as processes, curl, a stock
nginx reverse proxy with upstream keep-alive (started here with its own
config, stopped by PID), and HTTP/1.1 keep-alive services in this process
behind the pods."""

import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import threading
import time

import pytest

from conftest import (LocalService, Proc, ServerHandle, connect, free_port, http_pods,
                      public_ports, read_head, setup_pod, start_pod, wait_until)
from helpers import accepts, curl

DOMAIN = "pipe2.localhost"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


# ---- an HTTP/1.1 keep-alive service that says who it is and what it saw ----------------

class NamedService:
    """A keep-alive HTTP/1.1 service in this process answering
    "<name> <path> xff=<X-Forwarded-For> fwd=<Forwarded> ..."; it records every request."""

    def __init__(self, name):
        self.name, self.seen = name, []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.read_body()
                service.seen.append((self.path, dict(self.headers.items())))
                body = ("%s %s xff=%s fwd=%s proto=%s host=%s\n" % (
                    service.name, self.path, self.headers.get("X-Forwarded-For"),
                    self.headers.get("Forwarded"), self.headers.get("X-Forwarded-Proto"),
                    self.headers.get("X-Forwarded-Host"))).encode()
                self.send_response(200)
                if self.path.startswith("/chunked"):  # in two chunks, with a trailer
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % (
                        5, body[:5], len(body) - 5, body[5:]))
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def read_body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        self.rfile.read(size + 2) if size else None
                        if not size:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return
                self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def upgrade_then_echo(conn):
    """A service that switches every connection to raw echo (101) after its first head."""
    head = read_head(conn)
    if not head:
        return
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
    rest = head.partition(b"\r\n\r\n")[2]
    while True:
        if rest:
            conn.sendall(rest.upper())
        rest = conn.recv(4096)
        if not rest:
            break
    conn.shutdown(socket.SHUT_WR)


LEFTOVER = {}  # socket -> bytes read past the last response


def read_response(sock, timeout=10.0):
    """One HTTP/1.1 response with a Content-Length from a blocking socket:
    (status, headers dict lower-case, body); bytes after it are kept for the next call."""
    data = LEFTOVER.pop(sock, b"")
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response: %r" % data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    LEFTOVER[sock] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def read_all(sock, timeout=10.0):
    deadline, data = time.monotonic() + timeout, b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def get(name, path="/", extra=""):
    return ("GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, name, extra)).encode()


# ---- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """One server (nginx's address 127.0.0.7 trusted) with two http tunnels
    A and B whose pods run, each before its own NamedService, and a tunnel
    whose pod never starts."""
    workdir = str(tmp_path_factory.mktemp("fronts"))
    server = ServerHandle(workdir, extra=["--trusted-proxies", "127.0.0.7/32",
                                          "--max-pending-front", "100"])
    starters = {"A": lambda: NamedService("A"), "B": lambda: NamedService("B"),
                "U": lambda: LocalService(upgrade_then_echo)}
    with http_pods(server, workdir, starters) as running:
        tunnels = {name: (fqdn, public_ports(pod_dir)[0], service)
                   for name, (fqdn, pod_dir, service) in running.items()}
        offline_dir = os.path.join(workdir, "pod-offline")
        tunnels["offline"] = (setup_pod(server, offline_dir, "http", [free_port()]), None, None)
        server.workdir_ = workdir
        server.tunnels = tunnels
        yield server


def fqdn(front, name):
    return front.tunnels[name][0]


def answered_by(body):
    return body.split(b" ", 1)[0].decode()


# ---- 1. every request on a connection routed by its own Host ------------------------------

def test_fronts_keepalive_requests_each_reach_their_own_pod(front):
    order = ["A", "B", "A", "B", "B", "A"]
    with connect(front.http) as sock:
        for name in order:
            sock.sendall(get(fqdn(front, name), "/seq"))
            status, _headers, body = read_response(sock)
            assert status == 200 and answered_by(body) == name, (name, body)


def test_fronts_pipelined_requests_answered_in_order_by_their_own_pods(front):
    order = ["A", "B", "B", "A", "B", "A", "A", "B"]
    with connect(front.http) as sock:
        sock.sendall(b"".join(get(fqdn(front, name), "/p%d" % i) for i, name in enumerate(order)))
        for i, name in enumerate(order):
            status, _headers, body = read_response(sock)
            assert status == 200 and body.startswith(("%s /p%d " % (name, i)).encode()), body


def test_fronts_curl_next_on_one_connection(front):
    url = "http://127.0.0.1:%d/n" % front.http
    done = curl("-v", "-H", "Host: " + fqdn(front, "A"), url, "--next",
                "-H", "Host: " + fqdn(front, "B"), url, "--next",
                "-H", "Host: " + fqdn(front, "A"), url)
    assert done.returncode == 0, done.stderr.decode()
    assert [answered_by(line) for line in done.stdout.splitlines()] == ["A", "B", "A"]
    assert b"Re-using existing connection" in done.stderr  # one connection for all three


def test_fronts_chunked_and_sized_bodies_keep_the_framing(front):
    a, b = fqdn(front, "A"), fqdn(front, "B")
    with connect(front.http) as sock:
        sock.sendall(("POST /c HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "5\r\nGET /\r\n0\r\n\r\n" % a).encode()
                     + ("POST /l HTTP/1.1\r\nHost: %s\r\nContent-Length: 30\r\n\r\n" % b).encode()
                     + get(a, "/inside-a-body")[:30] + get(b, "/after"))
        bodies = [read_response(sock)[2] for _ in range(3)]
    assert [answered_by(body) for body in bodies] == ["A", "B", "B"], bodies
    assert bodies[2].startswith(b"B /after ")


def test_fronts_chunked_responses_relayed_and_the_connection_goes_on(front):
    """A service answering chunked (two chunks and a trailer): the consumer
    gets the response whole, and the next request on the connection, for
    another tunnel, is answered by that tunnel."""
    with connect(front.http) as sock:
        sock.sendall(get(fqdn(front, "A"), "/chunked") + get(fqdn(front, "B"), "/after",
                                                             "Connection: close\r\n"))
        answer = read_all(sock)
    first, _, second = answer.partition(b"X-T: 1\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in first, answer
    assert b"\r\n5\r\nA /ch\r\n" in first, answer
    assert second.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\nB /after " in second, answer


def test_fronts_upgrade_hands_the_connection_over_to_raw_bytes(front):
    with connect(front.http) as sock:
        sock.sendall(get(fqdn(front, "U"), "/ws", "Connection: Upgrade\r\nUpgrade: echo\r\n")
                     + get(fqdn(front, "A"), "/raw-now"))
        answer = b""
        while b"GET /RAW-NOW" not in answer:
            sock.settimeout(10)
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 101 "), answer  # after 101 the bytes went raw to U


def test_fronts_upgrade_refused_by_the_service_keeps_routing_by_host(front):
    with connect(front.http) as sock:  # A answers 200 to the Upgrade: HTTP goes on, B is B
        sock.sendall(get(fqdn(front, "A"), "/up", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
                     + get(fqdn(front, "B"), "/next"))
        first, second = read_response(sock)[2], read_response(sock)[2]
    assert answered_by(first) == "A" and second.startswith(b"B /next "), (first, second)


# ---- request smuggling shapes and CR/LF: 400, nothing reaches a pod ------------------------

SMUGGLING = {
    "cl-and-te": "POST / HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": "POST / HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n"
                 "Content-Length: 4\r\n\r\n0\r\n\r\n",
    "two-lengths": "POST / HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\n"
                   "Content-Length: 40\r\n\r\nabcd",
    "length-list": "POST / HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4, 40\r\n\r\nabcd",
    "obs-fold": "GET / HTTP/1.1\r\nHost: {a}\r\nX-Folded: one\r\n two\r\n\r\n",
    "obs-fold-te": "POST / HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "te-not-last-chunked": "POST / HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "te-in-http-1.0": "POST / HTTP/1.0\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # (its head went to A's service before the body showed the error: the
    # stream is cut, so the service never gets a whole request)
    "bad-chunk-size": "POST / HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "0x5\r\nhello\r\n0\r\n\r\n",
    "two-hosts": "GET / HTTP/1.1\r\nHost: {a}\r\nHost: {b}\r\n\r\n",
    "target-names-other-host": "GET http://{b}/ HTTP/1.1\r\nHost: {a}\r\n\r\n",
    "cr-in-path": "GET /x\rLocation: http://evil/ HTTP/1.1\r\nHost: {a}\r\n\r\n",
    "bare-cr-in-header": "GET / HTTP/1.1\r\nHost: {a}\r\nX-A: 1\rX-B: 2\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_fronts_smuggling_shapes_get_400_and_reach_no_pod(front, shape):
    services = [front.tunnels[name][2] for name in ("A", "B")]
    before = [len(service.seen) for service in services]
    text = SMUGGLING[shape].format(a=fqdn(front, "A"), b=fqdn(front, "B"))
    with connect(front.http) as sock:
        sock.sendall(text.encode() + get(fqdn(front, "B"), "/smuggled"))
        answer = read_all(sock)
    assert re.match(rb"HTTP/1\.1 400 ", answer) and b"\r\nServer: pipe2me\r\n" in answer, answer
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.1 \d{3} ", answer)) == 1, answer  # nothing else served
    assert [len(service.seen) for service in services] == before


def test_fronts_redirect_location_never_carries_control_characters(front, tmp_path):
    pod_dir = str(tmp_path / "https-only")
    name = setup_pod(front, pod_dir, "https", [free_port()])
    for target in (b"/a\rSet-Cookie:%20x=1", b"/a\nSet-Cookie: x=1", b"/a%0d%0aSet-Cookie:x"):
        with connect(front.http) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + name.encode()
                         + b"\r\nConnection: close\r\n\r\n")  # EOF ends the answer
            answer = read_all(sock)
        head = answer.partition(b"\r\n\r\n")[0]
        assert re.match(rb"HTTP/1\.1 (400|308) ", answer), answer
        for line in head.split(b"\r\n"):  # no header line of the consumer's making
            assert b"\r" not in line and b"\n" not in line
            assert not line.lower().startswith(b"set-cookie"), answer
    with connect(front.http) as sock:
        sock.sendall(b'GET /p?q="<x>"|{y} HTTP/1.1\r\nHost: ' + name.encode()
                     + b"\r\nConnection: close\r\n\r\n")
        location = re.search(rb"\r\nLocation: (\S+)\r\n", read_all(sock)).group(1)
    assert location.endswith(b"/p?q=%22%3Cx%3E%22%7C%7By%7D"), location


# ---- 3. forwarding headers ----------------------------------------------------------------

def test_fronts_forwarding_headers_replace_what_the_consumer_sent(front):
    spoof = ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
             "X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6\r\n")
    name = fqdn(front, "A")
    service = front.tunnels["A"][2]
    for port, host in ((front.http, name), (front.tunnels["A"][1], name)):  # front, per-port URL
        with connect(port) as sock:
            sock.sendall(get("%s:%d" % (host, port), "/h%d" % port, spoof))
            status, _headers, _body = read_response(sock)
        assert status == 200
        headers = service.seen[-1][1]
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        assert headers["X-Forwarded-Proto"] == "http"
        assert headers["X-Forwarded-Host"] == "%s:%d" % (host, port)
        assert headers["Forwarded"] == 'for=127.0.0.1;host="%s:%d";proto=http' % (host, port)
        assert sum(k.lower() == "x-forwarded-for" for k in headers) == 1


def test_fronts_forwarded_quotes_and_brackets_ipv6(server_mod):
    request = server_mod.parse_request(b"GET / HTTP/1.1\r\nHost: a.b:8080\r\nForwarded: for=x")
    lines = server_mod.forwarding_fields(request, "2001:db8::1", trusted=False)
    assert b'Forwarded: for="[2001:db8::1]";host="a.b:8080";proto=http' in lines
    assert b"X-Forwarded-For: 2001:db8::1" in lines and b"Forwarded: for=x" not in lines
    kept = server_mod.forwarding_fields(request, "10.0.0.1", trusted=True)
    assert b'Forwarded: for=x, for=10.0.0.1;host="a.b:8080";proto=http' in kept


def test_fronts_trusted_proxies_setting_is_parsed_and_documented(server_mod):
    settings = server_mod.load_settings(None, {"TRUSTED_PROXIES": "10.0.0.0/8, ::1,192.0.2.7"},
                                        environ={})
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.0.2.7/32"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("pipe2me.server.conf.example", "README.md"):
        with open(os.path.join(root, doc), encoding="utf-8") as fh:
            assert "TRUSTED_PROXIES" in fh.read(), doc


# ---- nginx with upstream keep-alive in front of the HTTP front ----------------------------

class CountingRelay:
    """A TCP relay that counts the connections it carries and connects
    onwards from the address its client came from (so the server sees
    nginx's own address)."""

    def __init__(self, target_port):
        self.target, self.connections = target_port, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            onward = socket.socket()
            onward.bind((peer[0], 0))
            onward.connect(("127.0.0.1", self.target))
            for a, b in ((conn, onward), (onward, conn)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


NGINX_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://front;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $arg_tunnel;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_bind {source};
        }}
    }}"""

NGINX_CONF = """
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream front {{ server 127.0.0.1:{relay}; keepalive 4; }}{servers}
}}
"""


@pytest.fixture
def nginx(front, tmp_path):
    relay = CountingRelay(front.http)
    ports = {"trusted_port": free_port(), "plain_port": free_port()}
    conf = tmp_path / "nginx.conf"
    servers = (NGINX_SERVER.format(port=ports["trusted_port"], source="127.0.0.7")
               + NGINX_SERVER.format(port=ports["plain_port"], source="127.0.0.8"))
    conf.write_text(NGINX_CONF.format(dir=tmp_path, relay=relay.port, servers=servers))
    proc = Proc([NGINX, "-p", str(tmp_path), "-c", str(conf)], str(tmp_path), "nginx")
    wait_until(lambda: all(accepts(p) for p in ports.values()), what="nginx listening")
    yield relay, ports
    proc.stop()
    relay.stop()


@pytest.mark.parametrize("trusted", [True, False])
def test_fronts_nginx_keepalive_alternating_tunnels_each_served_by_its_pod(front, nginx, trusted):
    relay, ports = nginx
    port = ports["trusted_port" if trusted else "plain_port"]
    order = ["A", "B"] * 5
    for i, name in enumerate(order):
        done = curl("--interface", "127.0.0.3",
                    "http://127.0.0.1:%d/n%d?tunnel=%s" % (port, i, fqdn(front, name)))
        assert done.returncode == 0, done.stderr
        line = done.stdout.decode()
        assert line.startswith("%s /n%d?" % (name, i)), (i, name, line)
        if trusted:  # nginx's X-Forwarded-For kept, with nginx's own address behind it
            assert " xff=127.0.0.3, 127.0.0.7 " in line, line
            assert 'fwd=for=127.0.0.7;host="%s";proto=http ' % fqdn(front, name) in line, line
        else:  # not trusted: what nginx says is replaced by the address it connects from
            assert " xff=127.0.0.8 " in line, line
    assert relay.connections <= 2, relay.connections  # nginx reused its upstream connections
    for name in ("A", "B"):  # each service saw the consumer's address, or nginx's
        xff = [headers["X-Forwarded-For"] for _path, headers in front.tunnels[name][2].seen[-5:]]
        assert set(xff) == {"127.0.0.3, 127.0.0.7" if trusted else "127.0.0.8"}


# ---- 4. honest errors ---------------------------------------------------------------------

def front_answer(port, name):
    """(status as text, body) of curl's GET / for Host `name` on the HTTP front at `port`."""
    done = curl("-w", "\n%{http_code}", "-H", "Host: " + name, "http://127.0.0.1:%d/" % port)
    body, _, code = done.stdout.decode().rpartition("\n")
    return code, body


def test_fronts_502_when_the_pod_is_not_connected(front):
    name = fqdn(front, "offline")
    code, body = front_answer(front.http, name)
    assert code == "502" and name in body and "not connected" in body, body
    page = curl("-H", "Accept: text/html", "-H", "Host: " + name, "http://127.0.0.1:%d/" % front.http)
    assert b"<html>" in page.stdout and b"502 Bad Gateway" in page.stdout and name.encode() in page.stdout


def test_fronts_503_when_the_local_service_refuses(front, tmp_path):
    pod_dir = str(tmp_path / "refusing")
    name = setup_pod(front, pod_dir, "http", [free_port()])  # nothing listens there
    pod = start_pod(str(tmp_path), pod_dir, name="refusing-pod")
    try:
        code, body = front_answer(front.http, name)
        assert code == "503" and name in body and "refused" in body, body
    finally:
        pod.stop()


def test_fronts_503_when_the_tunnel_is_at_its_stream_cap(tmp_path):
    server = ServerHandle(str(tmp_path), extra=["--max-streams-per-tunnel", "1"])
    service, pod = NamedService("capped"), None
    try:
        pod_dir = str(tmp_path / "capped")
        name = setup_pod(server, pod_dir, "http", [service.port])
        pod = start_pod(str(tmp_path), pod_dir, name="capped-pod")
        with connect(server.http) as held:  # a kept-alive connection holds the one stream
            held.sendall(get(name, "/hold"))
            assert read_response(held)[0] == 200
            code, body = front_answer(server.http, name)
        assert code == "503" and name in body and "cap of 1 open streams" in body, body
    finally:
        if pod is not None:
            pod.stop()
        service.stop()
        assert server.stop() == 0


def test_fronts_504_when_the_local_connect_times_out(front, tmp_path):
    full = socket.socket()  # a listener whose backlog is full: SYNs are dropped, connect hangs
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    pod_dir = str(tmp_path / "hanging")
    name = setup_pod(front, pod_dir, "http", [full.getsockname()[1]])
    pod = start_pod(str(tmp_path), pod_dir, "--connect-timeout", "1", name="hanging-pod")
    try:
        code, body = front_answer(front.http, name)
        assert code == "504" and name in body and "in time" in body, body
        assert "after 1 s" in body, body  # the pod's --connect-timeout, not the default 10 s
    finally:
        pod.stop()
        for sock in fillers + [full]:
            sock.close()


def test_fronts_h2c_prior_knowledge_refused_clearly_and_logged(front):
    seen = len(front.proc.stderr())
    done = curl("--http2-prior-knowledge", "-H", "Host: " + fqdn(front, "A"),
                "http://127.0.0.1:%d/" % front.http)
    assert done.returncode not in (0, 52), done
    assert b"HTTP/2 needs TLS" in done.stderr or done.returncode == 16, done.stderr
    front.proc.wait_for(r"refused cleartext HTTP/2 \(prior knowledge\) from=127\.0\.0\.1:\d+",
                        after=seen, timeout=5)


def test_fronts_own_answers_to_head_carry_no_body(front):
    """A HEAD the front answers itself (404 here) gets the head alone, so
    the next response on the connection is read as the next response."""
    with connect(front.http) as sock:
        sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: nobody.%s\r\n\r\n" % DOMAIN.encode()
                     + get(fqdn(front, "A"), "/after-head", "Connection: close\r\n"))
        answer = read_all(sock)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and b"\r\nContent-Length: " in head, answer
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\n"), answer
    assert answered_by(rest.partition(b"\r\n\r\n")[2]) == "A", answer


def test_fronts_server_header_names_no_version(front):
    done = curl("-sI", "http://127.0.0.1:%d/config" % front.http)
    server = re.search(rb"^Server: (.*?)\r?$", done.stdout, re.M | re.I)
    assert server and server.group(1) == b"pipe2me", done.stdout


def test_fronts_acme_challenge_without_a_hook_is_404_on_every_name(front):
    for name in (DOMAIN, fqdn(front, "A")):
        done = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: " + name,
                    "http://127.0.0.1:%d/.well-known/acme-challenge/tok_en-1" % front.http)
        assert done.stdout == b"404", (name, done.stdout)
    assert not any(p.startswith("/.well-known") for p, _ in front.tunnels["A"][2].seen)


# ---- issue 11: separate pending budgets with a per-source share ---------------------------

def flood(port, count, source="127.0.0.1"):
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))  # and never sends a byte
        socks.append(sock)
    return socks


def served_within(port, request, seconds, source="127.0.0.2", tls_name=None):
    started = time.monotonic()
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(seconds)
    sock.connect(("127.0.0.1", port))
    if tls_name:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname=tls_name)
    with sock:
        sock.sendall(request)
        answer = read_all(sock, seconds)
    return answer, time.monotonic() - started


def test_fronts_flood_from_one_address_leaves_both_fronts_to_others(front):
    request = ("GET /config HTTP/1.0\r\nHost: %s\r\n\r\n" % DOMAIN).encode()
    socks = flood(front.http, 150) + flood(front.https, 150)
    try:
        for port, tls in ((front.http, None), (front.https, DOMAIN)):
            answer, seconds = served_within(port, request, 1.0, tls_name=tls)
            assert answer.startswith(b"HTTP/1.0 200"), (port, answer)
            assert seconds < 1.0
    finally:
        for sock in socks:
            sock.close()
    for port, tls in ((front.http, None), (front.https, DOMAIN)):  # the flood's share comes back
        wait_until(lambda: served_within(port, request, 1.0, "127.0.0.1", tls)[0].startswith(
            b"HTTP/1.0 200"), timeout=5, what="127.0.0.1 served again")


# ---- issue 11: a ClientHello split over several TLS records -------------------------------

def split_client_hello(name, pieces=3):
    """A ClientHello for `name` from Python's ssl, re-framed as `pieces`
    handshake records; returns (sslobj, incoming BIO, outgoing BIO, bytes)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    assert record[0] == 22 and len(record) == 5 + int.from_bytes(record[3:5], "big")
    body = record[5:]  # the first record ends before the server_name extension
    step = -(-(len(body) - 40) // (pieces - 1))
    cuts = [0, 40] + list(range(40 + step, len(body), step)) + [len(body)]
    framed = b"".join(record[:3] + (b - a).to_bytes(2, "big") + body[a:b]
                      for a, b in zip(cuts, cuts[1:]))
    return tls, incoming, outgoing, framed


def test_fronts_sni_front_reads_a_client_hello_split_over_records(front):
    tls, incoming, outgoing, framed = split_client_hello(DOMAIN)
    with connect(front.https) as sock:
        for i in range(0, len(framed), 100):  # and each record in several TCP segments
            sock.sendall(framed[i:i + 100])
        deadline = time.monotonic() + 10
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                sock.sendall(outgoing.read())
            assert time.monotonic() < deadline
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            assert data, "the SNI front closed the connection"
            incoming.write(data)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        tls.write(("GET /config HTTP/1.0\r\nHost: %s\r\n\r\n" % DOMAIN).encode())
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data
                incoming.write(data)
    assert answer.startswith(b"HTTP/1.0 200"), answer


def test_fronts_client_hello_parser_bounds(server_mod):
    _tls, _in, _out, framed = split_client_hello("x.pipe2.localhost", pieces=4)
    assert server_mod.tls_client_hello_sni(framed) == "x.pipe2.localhost"
    assert server_mod.tls_client_hello_sni(framed[:-1]) is None
    huge = b"\x16\x03\x01\x00\x04\x01\x01\x00\x00"  # announces a 64 KiB ClientHello
    with pytest.raises(ValueError):
        server_mod.tls_client_hello_sni(huge)
    with pytest.raises(ValueError):
        server_mod.tls_client_hello_sni(framed[:5] + b"\x17" + framed[6:])
