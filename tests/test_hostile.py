"""Hostile input and abuse brakes (issue 4, points 8-13 and "Abuse brakes").

Real server processes on 127.0.0.1 are fed malformed, oversized, slow and
forged input on every port they listen on: the API (through the HTTP front
and over TLS), the tunnel port, the HTTPS front, the certificate endpoint,
the token checks. Every attack must end in a 4xx or a closed connection
within a bounded time, name its reason in the server log where the issue
asks for it, leave the state on disk as it was, and leave the server, its
other clients and its other tunnels working.

The servers here run with short FRONT_HEAD_DEADLINE, API_REQUEST_DEADLINE
and HELLO_TIMEOUT so that slow clients are cut off within seconds; the
defaults (10 s, 20 s and 10 s) are checked to stay sane. Each test prints
what it tried and what came back (`pytest -s` shows it)."""

import hashlib
import json
import os
import random
import re
import select
import shlex
import socket
import ssl
import threading
import time

import pytest

from conftest import (clean_env, POD, ServerHandle, free_port, setup_pod, start_pod, wait_until,
                      write_tokens)
from helpers import DOMAIN, RawPod, api, cert_fields, cert_sha256, create_tunnel, make_csr, make_key, openssl
MAIN_TOKEN = "main-token-hostile"
UNIQUE_TOKEN = "unique-token-hostile"
SHORT_TOKEN = "short-token-hostile"
CAP_TOKEN = "cap-token-hostile"
HEAD_DEADLINE_S = 3          # --front-head-deadline of the servers below
API_DEADLINE_S = 5           # --api-request-deadline
HELLO_DEADLINE_S = 3         # --hello-timeout
SLACK_S = 2.5                # the sweep runs every second; scheduling on a busy CI box
DEADLINE_FLAGS = ["--front-head-deadline", str(HEAD_DEADLINE_S),
                  "--api-request-deadline", str(API_DEADLINE_S),
                  "--hello-timeout", str(HELLO_DEADLINE_S)]
ATTACKER = "127.0.0.8"       # source address of the point-8 requests (own rate-limit bucket)


def report(area, case, outcome, seconds=None):
    took = "" if seconds is None else " in %.2f s" % seconds
    print("hostile %s %-32s -> %s%s" % (area, case, outcome, took))


# ---- servers ------------------------------------------------------------------------

class Server(ServerHandle):
    """A server reading no configuration of this machine, with known tokens."""

    def __init__(self, workdir, extra=(), tokens=()):
        state_dir = write_tokens(os.path.join(workdir, "state"),
                                 ["%s = max_ports:4 lifespan:1h" % MAIN_TOKEN] + list(tokens))
        super().__init__(workdir, extra=extra, env=clean_env(os.path.join(workdir, "home")),
                         state_dir=state_dir)
        self.token = MAIN_TOKEN
        self.cafile = os.path.join(workdir, "cacert.pem")
        with open(self.cafile, "wb") as fh:
            fh.write(api_call(self, "GET", "/cacert")[1])

    def wait_log(self, pattern, mark, timeout=10.0):
        return self.proc.wait_for(pattern, timeout=timeout, after=mark)

    def log_count(self, pattern, mark=0):
        return len(re.findall(pattern, self.proc.stderr()[mark:]))

    def snapshot(self):
        """Every state file that a request could change, with its bytes."""
        files = {}
        for sub in ("tunnels", os.path.join("ca", "issued")):
            directory = os.path.join(self.state_dir, sub)
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
                with open(os.path.join(directory, name), "rb") as fh:
                    files[os.path.join(sub, name)] = fh.read()
        for name in ("used_tokens.json", "tokens.conf"):
            path = os.path.join(self.state_dir, name)
            if os.path.exists(path):
                with open(path, "rb") as fh:
                    files[name] = fh.read()
        return files

    def tls_context(self):
        return ssl.create_default_context(cafile=self.cafile)

    def assert_up(self):
        assert self.proc.alive(), self.proc.stderr()[-3000:]
        status, body = api_call(self, "GET", "/config")
        assert status == 200 and body["tunnel_port"] == self.tunnel, body
        assert "Traceback" not in self.proc.stderr(), self.proc.stderr()[-3000:]


def api_call(server, method, path, body=None, **options):
    """(status, JSON object or bytes) of one API request by the bare domain's name."""
    options.setdefault("timeout", 10.0)
    return api(server, method, path, body, host=DOMAIN, **options).pair()


# ---- raw connections ----------------------------------------------------------------------

def connect(port, source=None, timeout=10.0, rcvbuf=None):
    sock = socket.socket()
    sock.settimeout(timeout)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock, within_s):
    """All the peer sends until it closes (EOF or reset); fails the test if the
    connection is still open after within_s."""
    got = bytearray()
    end = time.monotonic() + within_s
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError("connection still open after %.1f s (got %r)"
                                 % (within_s, bytes(got[:200])))
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except (ssl.SSLError, OSError):
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


def status_of(answer):
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def exchange(port, data, tls_context=None, server_hostname=None, source=ATTACKER,
             within_s=10.0):
    """Send `data`, read until the server closes: (status or None, answer, seconds)."""
    start = time.monotonic()
    sock = connect(port, source)
    try:
        if tls_context:
            sock = tls_context.wrap_socket(sock, server_hostname=server_hostname)
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may refuse before all of a big request is sent
        answer = read_until_closed(sock, within_s)
    finally:
        sock.close()
    return status_of(answer), answer, time.monotonic() - start


def assert_api_error(answer):
    """An answer of the API itself is JSON {"error": one line}, never a traceback."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Traceback" not in answer
    if b"application/json" in head:
        error = json.loads(body.decode())["error"]
        assert error and "\n" not in error, body


def client_hello(server_name, alpn=None):
    """The bytes of a real TLS ClientHello (SNI server_name, none if None)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Trickler(threading.Thread):
    """A slow client: sends `prefix` at once, then `rest` one byte per second
    until the server answers or closes; records when and how that happened."""

    def __init__(self, port, prefix=b"", rest=b"", tls=None, server_hostname=None,
                 source=ATTACKER, max_s=40.0):
        super().__init__(daemon=True)
        self.args = port, prefix, rest, tls, server_hostname, source
        self.max_s = max_s
        self.connected = threading.Event()
        self.closed_after = None     # seconds from connect to the server's close
        self.answer = b""
        self.start()

    def run(self):
        port, prefix, rest, tls, server_hostname, source = self.args
        sock = connect(port, source)
        start = time.monotonic()
        try:
            if tls:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname)
            sock.sendall(prefix)
            self.connected.set()
            self.trickle(sock, rest, start)
        except OSError:
            self.closed_after = time.monotonic() - start
        finally:
            self.connected.set()
            sock.close()

    def trickle(self, sock, rest, start):
        next_send, index = start, 0
        while time.monotonic() - start < self.max_s:
            if index < len(rest) and time.monotonic() >= next_send:
                sock.sendall(rest[index:index + 1])
                index, next_send = index + 1, next_send + 1.0
            wait = min(max(next_send - time.monotonic(), 0.0), 1.0)
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                continue
            sock.settimeout(0.1)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue  # TLS records that carry no data (session tickets)
            self.answer = data + (read_until_closed(sock, 5.0) if data else b"")
            self.closed_after = time.monotonic() - start
            return
        raise AssertionError("still open after %.0f s" % self.max_s)


# ---- fixtures --------------------------------------------------------------------------------

def info(pod_dir):
    """pipe2me.info.inc as a dict (single-quoted shell values)."""
    values = {}
    with open(os.path.join(pod_dir, "pipe2me.info.inc"), encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.strip().partition("=")
            if key:
                values[key] = shlex.split(value)[0] if value else ""
    return values


class PodIdentity:
    """A pod dir that has been set up: its tunnel, files and public ports."""

    def __init__(self, server, pod_dir, protocols, token=MAIN_TOKEN):
        protos = protocols.split(",")
        self.local_ports = [free_port() for _ in protos]
        self.fqdn = setup_pod(server, pod_dir, protocols, self.local_ports, token=token)
        self.dir = pod_dir
        values = info(pod_dir)
        self.id, self.secret = values["PIPE2ME_ID"], values["PIPE2ME_SECRET"]
        self.ports = {proto: int(values["PIPE2ME_URLS_%d" % i].rsplit(":", 1)[1])
                      for i, proto in enumerate(protos)}
        self.cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
        self.key = os.path.join(pod_dir, "pipe2me.openssl.priv")
        self.cacert = os.path.join(pod_dir, "pipe2me.cacert")


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """A server without pods and one tunnel whose state must survive everything."""
    workdir = str(tmp_path_factory.mktemp("api"))
    server = Server(workdir, DEADLINE_FLAGS + ["--max-certs-per-hour", "0"],  # signs many
                    ["%s = max_ports:1 unique:true" % UNIQUE_TOKEN])
    status, server.victim = create_tunnel(server, MAIN_TOKEN, ["http", "https"])
    assert status == 201, server.victim
    yield server
    assert server.stop() == 0


def foreign_ca_leaf(workdir, fqdn):
    """A CA that is not the server's, and a leaf for `fqdn` signed by it."""
    def path(name):
        return os.path.join(workdir, name)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", path("evil-ca.key"), "-out", path("evil-ca.pem"), "-days", "2",
            "-subj", "/CN=evil CA", "-config", os.devnull,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", path("evil.key"), "-out", path("evil.csr"), "-subj", "/CN=" + fqdn,
            "-config", os.devnull)
    with open(path("evil.ext"), "w") as fh:
        fh.write("subjectAltName=DNS:%s\nextendedKeyUsage=clientAuth,serverAuth\n" % fqdn)
    openssl("x509", "-req", "-in", path("evil.csr"), "-CA", path("evil-ca.pem"),
            "-CAkey", path("evil-ca.key"), "-CAcreateserial", "-days", "1",
            "-extfile", path("evil.ext"), "-out", path("evil.pem"))
    return path("evil.pem"), path("evil.key")


class Relay:
    """A server with a live pod (`live`, echo services), a tunnel whose
    certificate the raw client below uses (`raw`), a deleted one and an
    expired one."""


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("relay"))
    server = Server(workdir, DEADLINE_FLAGS, ["%s = max_ports:1 lifespan:3" % SHORT_TOKEN])
    r = Relay()
    r.server, r.workdir = server, workdir
    # the short-lived tunnel first: it expires while the others are set up
    r.expired = PodIdentity(server, os.path.join(workdir, "expired"), "tcp", SHORT_TOKEN)
    r.live = PodIdentity(server, os.path.join(workdir, "live"), "tcp,http,https")
    r.raw = PodIdentity(server, os.path.join(workdir, "raw"), "tcp")
    r.deleted = PodIdentity(server, os.path.join(workdir, "deleted"), "tcp")
    status, body = api_call(server, "DELETE", "/tunnels/" + r.deleted.id, secret=r.deleted.secret)
    assert status == 200, body
    r.evil_cert, r.evil_key = foreign_ca_leaf(workdir, r.live.fqdn)
    r.pod = start_pod(workdir, r.live.dir, "--echo", name="live-pod")
    wait_until(lambda: api_call(server, "GET", "/tunnels/%s/verify" % r.expired.id)[0] == 410,
               timeout=10, what="the short-lived tunnel to expire")
    yield r
    assert r.pod.stop() == 0
    assert server.stop() == 0


def consumer_round_trip(relay, size=4096):
    """A consumer through the live tunnel's tcp service gets its bytes back."""
    payload = os.urandom(size)
    with connect(relay.live.ports["tcp"], timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_until_closed(sock, 5.0) == payload


def assert_live_tunnel_unaffected(relay):
    consumer_round_trip(relay)
    assert relay.pod.alive()
    connected = relay.server.log_count(r"pod connected tunnel=%s " % relay.live.id)
    assert connected == 1, "the live pod had to reconnect"


# =====================================================================================
# 8. API: malformed, oversized, non-UTF-8, invalid JSON, path tricks, unknown methods
# =====================================================================================

def api_cases(server):
    """name -> (raw request, statuses allowed; None = closed without an answer)."""
    tid, secret = server.victim["id"], server.victim["secret"]
    host = b"Host: " + DOMAIN.encode() + b"\r\n"

    def post(path, body, ctype=b"application/json", extra=b""):
        return (b"POST %s HTTP/1.0\r\n" % path.encode() + host + b"Content-Type: " + ctype
                + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)

    auth = b"Authorization: Bearer " + secret.encode() + b"\r\n"
    csr_path = "/tunnels/%s/cert" % tid
    return {
        # request lines
        "line-empty": (b"\r\n\r\n", {400, None}),  # no request at all: closing is an answer
        "line-one-word": (b"GARBAGE\r\n" + host + b"\r\n", {400}),
        "line-no-path": (b"GET\r\n" + host + b"\r\n", {400}),
        "line-http-0.9": (b"GET /config\r\n\r\n", {400}),
        "line-four-words": (b"GET /config HTTP/1.0 extra\r\n" + host + b"\r\n", {400}),
        "line-bad-protocol": (b"GET /config FOO/1.0\r\n" + host + b"\r\n", {400}),
        "line-version-9.9": (b"GET /config HTTP/9.9\r\n" + host + b"\r\n", {400, 505}),
        "line-version-junk": (b"GET /config HTTP/1.x\r\n" + host + b"\r\n", {400}),
        "line-binary": (bytes(range(1, 32)) + b"\x7f\xff\r\n\r\n", {400}),
        "line-nul-in-path": (b"GET /con\x00fig HTTP/1.0\r\n" + host + b"\r\n", {400, 404}),
        "line-bare-lf": (b"GET /nope HTTP/1.0\n" + host.replace(b"\r\n", b"\n") + b"\n", {404}),
        "line-70kb": (b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n" + host + b"\r\n", {414, 431}),
        # headers
        "header-100kb-one": (b"GET /config HTTP/1.0\r\n" + host + b"X-Big: " + b"b" * 100000
                             + b"\r\n\r\n", {431}),
        "header-100kb-many": (b"GET /config HTTP/1.0\r\n" + host
                              + b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 40) for i in range(2000))
                              + b"\r\n", {431}),
        "header-no-colon": (b"GET /nope HTTP/1.0\r\n" + host + b"no colon here\r\n\r\n",
                            {400, 404}),
        # bodies
        "length-negative": (post("/tunnels", b"", extra=b"Content-Length: -1\r\n")
                            .replace(b"Content-Length: 0\r\n", b""), {400}),
        "length-text": (post("/tunnels", b"").replace(b"Content-Length: 0", b"Content-Length: ten"),
                        {400}),
        "length-superscript": (post("/tunnels", b"").replace(b"Content-Length: 0",
                                                             b"Content-Length: \xb2"), {400}),
        "length-5000-digits": (post("/tunnels", b"").replace(b"Content-Length: 0",
                                                             b"Content-Length: " + b"9" * 5000),
                               {413}),
        "length-2^70": (post("/tunnels", b"").replace(b"Content-Length: 0",
                                                      b"Content-Length: %d" % 2 ** 70), {413}),
        "length-twice": (post("/tunnels", b"{}").replace(b"Content-Length: 2",
                                                         b"Content-Length: 2\r\nContent-Length: 900"),
                         {400, 401}),
        "body-chunked": (b"POST /tunnels HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n", {400, 411}),
        # non-UTF-8
        "utf8-path": (b"GET /tunnels/\xff\xfe\xc0\xaf HTTP/1.0\r\n" + host + b"\r\n", {404}),
        "utf8-json-body": (post("/tunnels", b'{"token": "\xff\xfe", "protocols": ["tcp"]}'),
                           {400}),
        "utf8-form-body": (post("/tunnels", b"token=\xff\xfe&protocols=tcp",
                                b"application/x-www-form-urlencoded"), {400, 403}),
        "utf8-auth-header": (b"GET /tunnels/%s HTTP/1.0\r\n" % tid.encode() + host
                             + b"Authorization: Bearer \xff\xfe\r\n\r\n", {401}),
        "utf8-host": (b"GET /no-such-page HTTP/1.0\r\nHost: \xff\xfe." + DOMAIN.encode()
                      + b"\r\n\r\n", {400, 404}),  # RFC 9112 §3.2: an invalid Host is a 400
        # invalid JSON and JSON of the wrong shape
        "json-truncated": (post("/tunnels", b'{"token": "x", "protocols": ['), {400}),
        "json-array": (post("/tunnels", b'["token"]'), {400}),
        "json-string": (post("/tunnels", b'"token"'), {400}),
        "json-null": (post("/tunnels", b"null"), {400}),
        "json-deep-nesting": (post("/tunnels", b'{"token": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
                              {400}),
        "json-huge-number": (post("/tunnels", b'{"token": 1' + b"0" * 5000 + b"}"), {400}),
        "json-nan": (post("/tunnels", b'{"token": NaN, "protocols": ["tcp"]}'), {400}),
        "json-token-list": (post("/tunnels", b'{"token": ["x"], "protocols": ["tcp"]}'), {400}),
        "json-token-object": (post("/tunnels", b'{"token": {"a": 1}, "protocols": ["tcp"]}'),
                              {400}),
        "json-token-number": (post("/tunnels", b'{"token": 12345, "protocols": ["tcp"]}'),
                              {400}),
        "json-protocols-object": (post("/tunnels", b'{"token": "%s", "protocols": {"tcp": 1}}'
                                       % MAIN_TOKEN.encode()), {400}),
        "json-protocols-nested": (post("/tunnels", b'{"token": "%s", "protocols": [["tcp"]]}'
                                       % MAIN_TOKEN.encode()), {400}),
        "json-protocols-20000": (post("/tunnels", json.dumps(
            {"token": MAIN_TOKEN, "protocols": ["tcp"] * 20000}).encode()), {400, 413, 422}),
        "json-secret-list": (post(csr_path, b'{"secret": ["x"], "csr": "x"}'), {400, 401}),
        "json-secret-object": (post("/tunnels/%s/extend" % tid, b'{"secret": {"a": 1}}'),
                               {400, 401}),
        "json-csr-number": (post(csr_path, b'{"csr": 5}', extra=auth), {400}),
        "json-csr-list": (post(csr_path, b'{"csr": ["-----BEGIN"]}', extra=auth), {400}),
        "json-extend-token-list": (post("/tunnels/%s/extend" % tid, b'{"token": ["x"]}',
                                        extra=auth), {400}),
        "json-dup-keys": (post("/tunnels", b'{"token": "x", "token": ["y"]}'), {400}),
        # ids with ../ and friends
        "id-dotdot": (b"GET /tunnels/../tokens.conf HTTP/1.0\r\n" + host + b"\r\n", {404}),
        "id-dotdot-encoded": (b"GET /tunnels/..%2F..%2Ftokens.conf HTTP/1.0\r\n" + host + b"\r\n",
                              {404}),
        "id-dotdot-verify": (b"GET /tunnels/..%2Fused_tokens/verify HTTP/1.0\r\n" + host
                             + b"\r\n", {404}),
        "id-dotdot-delete": (b"DELETE /tunnels/..%2F" + tid.encode() + b" HTTP/1.0\r\n" + host
                             + auth + b"\r\n", {404}),
        "id-dotdot-cert": (post("/tunnels/%2e%2e/cert", b'{"csr": "x"}', extra=auth), {404}),
        "id-dotdot-real": (b"GET /tunnels/" + tid.encode() + b"/../" + tid.encode()
                           + b" HTTP/1.0\r\n" + host + auth + b"\r\n", {404}),
        "id-nul": (b"GET /tunnels/%00/verify HTTP/1.0\r\n" + host + b"\r\n", {404}),
        "id-absolute-url": (b"GET http://evil.example/tunnels/" + tid.encode() + b" HTTP/1.0\r\n"
                            + host + b"\r\n", {400, 401, 404}),
        "id-bad-ipv6-url": (b"GET http://[::1/tunnels HTTP/1.0\r\n" + host + b"\r\n", {400}),
        # methods
        "method-unknown": (b"FOO /config HTTP/1.0\r\n" + host + b"\r\n", {405}),
        "method-lowercase": (b"get /config HTTP/1.0\r\n" + host + b"\r\n", {405}),
        "method-propfind": (b"PROPFIND /tunnels HTTP/1.0\r\n" + host + b"\r\n", {405}),
        "method-trace": (b"TRACE / HTTP/1.0\r\n" + host + b"\r\n", {405}),
        "method-connect": (b"CONNECT evil.example:443 HTTP/1.0\r\n" + host + b"\r\n", {400, 404}),
        "method-patch-tunnel-no-body": (b"PATCH /tunnels/" + tid.encode() + b" HTTP/1.0\r\n" + host
                                        + auth + b"\r\n", {400}),
        "method-patch-tunnel-unknown-key": (b"PATCH /tunnels/" + tid.encode() + b" HTTP/1.0\r\n"
                                            + host + auth + b"Content-Length: 16\r\n\r\n"
                                            + b'{"ports": [1,2]}', {400}),
        "method-patch-tunnels": (b"PATCH /tunnels HTTP/1.0\r\n" + host + b"\r\n", {405}),
        "method-put-tunnels": (post("/tunnels", b'{"token": "%s", "protocols": ["tcp"]}'
                                    % MAIN_TOKEN.encode()).replace(b"POST", b"PUT", 1), {405}),
        "method-10kb": (b"X" * 10000 + b" /config HTTP/1.0\r\n" + host + b"\r\n", {400, 405}),
    }


@pytest.mark.parametrize("transport", ["http", "https"])
def test_api_hostile_requests_get_4xx_and_change_nothing(api_server, transport):
    server = api_server
    before = server.snapshot()
    port = server.http if transport == "http" else server.https
    context = server.tls_context() if transport == "https" else None
    wrong = []
    for case, (request, allowed) in sorted(api_cases(server).items()):
        status, answer, seconds = exchange(port, request, context, DOMAIN if context else None)
        report("api/" + transport, case, status or "closed", seconds)
        assert_api_error(answer)
        if status not in allowed:
            wrong.append((case, status, answer[:300]))
    assert not wrong, wrong
    assert server.snapshot() == before
    server.assert_up()


def test_api_10mb_bodies_refused_without_being_read(api_server):
    server = api_server
    before, rss_before = server.snapshot(), rss_kib(server.proc.pid)
    ten_mb = 10 * 1024 * 1024
    head = (b"POST /tunnels HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (DOMAIN.encode(), ten_mb))
    for transport in ("http", "https"):
        context = server.tls_context() if transport == "https" else None
        port = server.http if transport == "http" else server.https
        # the head alone is answered at once; the body is then refused
        sock = connect(port, ATTACKER)
        if context:
            sock = context.wrap_socket(sock, server_hostname=DOMAIN)
        start = time.monotonic()
        sock.sendall(head)
        answer = read_until_closed(sock, 5.0)
        report("api/" + transport, "body-10mb-head-first", status_of(answer),
               time.monotonic() - start)
        assert status_of(answer) == 413, answer[:300]
        assert_api_error(answer)
        assert send_until_refused(sock, ten_mb) < ten_mb
        sock.close()
        # all of it at once: a 413 or a reset, within seconds, nothing kept
        status, answer, seconds = exchange(port, head + b"{" * ten_mb, context,
                                           DOMAIN if context else None, within_s=10)
        report("api/" + transport, "body-10mb-at-once", status or "reset", seconds)
        assert status in (413, None), answer[:300]
    growth_mib = (rss_kib(server.proc.pid) - rss_before) / 1024
    report("api", "rss-growth-after-40mb-of-bodies", "%.1f MiB" % growth_mib)
    assert growth_mib < 8
    assert server.snapshot() == before
    server.assert_up()


def send_until_refused(sock, limit):
    """Send up to `limit` bytes; returns how many went out before the peer refused."""
    chunk, sent = b"{" * 65536, 0
    sock.settimeout(5)
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (OSError, ssl.SSLError):
        pass
    return sent


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


@pytest.mark.slow
def test_api_slow_clients_cut_off_while_others_are_served(api_server):
    """30 slow clients (slowloris) on both fronts: each is closed within its
    deadline, and normal requests are answered at once meanwhile."""
    server = api_server
    before = server.snapshot()
    host = b"Host: " + DOMAIN.encode() + b"\r\n"
    head = b"POST /tunnels HTTP/1.0\r\n" + host + b"Content-Length: 1000\r\n\r\n"
    hello = client_hello(DOMAIN)
    kinds = {  # kind: (count, Trickler arguments, bound on the close)
        "http-head-1-byte-per-s": (10, dict(port=server.http, rest=head),
                                   HEAD_DEADLINE_S + SLACK_S),
        "http-body-1-byte-per-s": (8, dict(port=server.http, prefix=head, rest=b"{" * 1000),
                                   API_DEADLINE_S + SLACK_S),
        "http-body-stalled": (2, dict(port=server.http, prefix=head + b'{"token"'),
                              API_DEADLINE_S + SLACK_S),
        "https-head-1-byte-per-s": (5, dict(port=server.https, rest=head, tls=server.tls_context(),
                                            server_hostname=DOMAIN), API_DEADLINE_S + SLACK_S),
        "https-hello-1-byte-per-s": (5, dict(port=server.https, rest=hello),
                                     HEAD_DEADLINE_S + SLACK_S),
    }
    # from four addresses: one address gets only a share of the API's workers
    slow = [(kind, bound, Trickler(source="127.0.0.%d" % (100 + n % 4), **args))
            for kind, (count, args, bound) in kinds.items() for n in range(count)]
    assert len(slow) == 30
    for _, _, client in slow:
        assert client.connected.wait(10)
    served = []
    for transport in ("http", "https", "http", "https"):
        start = time.monotonic()
        status, body = api_call(server, "GET", "/tunnels/" + server.victim["id"],
                                secret=server.victim["secret"], tls=transport == "https",
                                timeout=5)
        served.append(time.monotonic() - start)
        assert status == 200 and body["id"] == server.victim["id"], body
    assert all(client.closed_after is None for _, _, client in slow), \
        "a slow client was closed before the normal requests were done"
    report("api", "normal-requests-during-30-slow", "served", max(served))
    assert max(served) < 2.0, served
    for kind, bound, client in slow:
        client.join(bound + 5)
        assert client.closed_after is not None, kind
        assert client.closed_after <= bound, (kind, client.closed_after)
        assert status_of(client.answer) in (None, 408, 431), (kind, client.answer[:200])
    for kind in kinds:
        times = [c.closed_after for k, _, c in slow if k == kind]
        report("api", "slow/" + kind, "closed", max(times))
    assert server.snapshot() == before
    server.assert_up()


def test_api_deadlines_default_to_sane_values(server_mod):
    keys = server_mod.CONFIG_KEYS
    assert 1 <= server_mod.parse_duration(keys["FRONT_HEAD_DEADLINE"][0]) <= 30
    assert 5 <= server_mod.parse_duration(keys["API_REQUEST_DEADLINE"][0]) <= 60
    assert 5 <= server_mod.parse_duration(keys["HELLO_TIMEOUT"][0]) <= 30


# =====================================================================================
# 9. Tunnel port: every forged or broken pod connection is closed with a logged reason
# =====================================================================================

def raw_pod(mod, relay, cert=None, key=None, max_tls=None):
    """A hand-made pod connection to the relay's server (helpers.RawPod)."""
    return RawPod(mod, relay.server.tunnel, relay.raw.cacert, cert, key, timeout=5,
                  max_tls=max_tls)


def welcomed(mod, relay):
    """A raw pod session of the `raw` tunnel, attached on the server."""
    mark = relay.server.mark()
    pod = raw_pod(mod, relay, relay.raw.cert, relay.raw.key)
    answer = pod.hello(relay.raw.id)
    assert answer and answer[0] == mod.Msg.WELCOME, answer
    relay.server.wait_log(r"pod connected tunnel=%s .* pod=127\.0\.0\.1:%d" % (
        relay.raw.id, pod.port), mark, 5.0)
    return pod


def opened_stream(mod, relay, pod):
    """A consumer on the raw tunnel's port (that does not read): the stream id."""
    consumer = connect(relay.raw.ports["tcp"], rcvbuf=4096)
    event = pod.next_event(5.0, mod.Msg.OPEN)
    assert event is not None, "no OPEN for the consumer"
    pod.consumer = consumer
    return event[1]


def attack_plain(data):
    def attack(mod, relay):
        sock = connect(relay.server.tunnel, timeout=5)
        port = sock.getsockname()[1]
        sock.sendall(data)
        read_until_closed(sock, 5.0)
        sock.close()
        return port, None
    return attack


def attack_tls(cert_of, tunnel_of=lambda r: r.raw.id, version=1, kind="control", max_tls=None):
    def attack(mod, relay):
        cert, key = cert_of(relay) if cert_of else (None, None)
        pod = raw_pod(mod, relay, cert, key, max_tls)
        answer = pod.hello(tunnel_of(relay), version, kind)
        events = [answer] if answer else []
        events += pod.until_closed()
        pod.close()
        return pod.port, events
    return attack


def attack_greeting(first_bytes):
    def attack(mod, relay):
        pod = raw_pod(mod, relay, relay.raw.cert, relay.raw.key)
        pod.send(first_bytes(mod))
        events = pod.until_closed()
        pod.close()
        return pod.port, events
    return attack


def attack_session(frames, with_stream=False):
    """WELCOMEd as the raw tunnel, then send frames(mod, stream id)."""
    def attack(mod, relay):
        pod = welcomed(mod, relay)
        stream = opened_stream(mod, relay, pod) if with_stream else 0
        pod.send(frames(mod, stream))
        events = pod.until_closed()
        pod.close()
        return pod.port, events
    return attack


def attack_beyond_window(mod, relay):
    """DATA past the stream's window while the consumer reads nothing."""
    pod = welcomed(mod, relay)
    stream = opened_stream(mod, relay, pod)
    chunk = b"w" * mod.MAX_FRAME_BYTES
    frame = mod.encode_frame(mod.Msg.DATA, stream, chunk)

    def credit():  # what the server has granted beyond the initial window so far
        return sum(mod.U32.unpack(p)[0] for m, s, p in pod.events
                   if m == mod.Msg.WINDOW and s == stream)
    sent = 0  # the server's socket buffers take a few MB: go 1 MB past what it granted
    while (sent <= mod.STREAM_WINDOW_BYTES + credit() + (1 << 20) and sent < 64 << 20
           and not pod.closed and pod.send(frame)):
        sent += len(chunk)
        pod.receive(0.001)
    pod.events = pod.until_closed()  # all of them, from the start
    credit = credit()
    events = pod.events
    report("tunnel", "beyond-window-figures", "sent %d granted %d" % (
        sent, mod.STREAM_WINDOW_BYTES + credit))
    assert sent > mod.STREAM_WINDOW_BYTES + credit, "the attack stayed within the window"
    pod.consumer.close()
    pod.close()
    return pod.port, events


FAILED = r"pod handshake failed pod=127\.0\.0\.1:{port} reason=.*"
REFUSED = r"pod refused pod=127\.0\.0\.1:{port} reason=.*"
EITHER = r"pod (handshake failed|refused) pod=127\.0\.0\.1:{port} reason=.*"
BROKE = r"pod disconnected tunnel={raw} pod=127\.0\.0\.1:{port} reason=protocol error: .*"

TUNNEL_ATTACKS = {
    # name: (attack, log line with the reason, reason expected in a GOAWAY/REJECT or None)
    "garbage-bytes": (attack_plain(bytes(random.Random(9).randrange(256) for _ in range(4096))),
                      FAILED, None),
    "plain-http": (attack_plain(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"),
                   FAILED + "(http request|version)", None),
    "tls-without-client-cert": (attack_tls(None), FAILED + "certificate", None),
    "tls-cert-of-other-ca": (attack_tls(lambda r: (r.evil_cert, r.evil_key),
                                        lambda r: r.live.id), FAILED + "certificate verify failed",
                             None),
    "tls-1.2-only": (attack_tls(lambda r: (r.raw.cert, r.raw.key), max_tls=ssl.TLSVersion.TLSv1_2),
                     FAILED + "(unsupported protocol|version)", None),
    "cert-of-deleted-tunnel": (attack_tls(lambda r: (r.deleted.cert, r.deleted.key),
                                          lambda r: r.deleted.id),
                               REFUSED + "belongs to no tunnel", "belongs to no tunnel"),
    "cert-of-expired-tunnel": (attack_tls(lambda r: (r.expired.cert, r.expired.key),
                                          lambda r: r.expired.id), EITHER + "expired", None),
    "hello-for-another-tunnel": (attack_tls(lambda r: (r.raw.cert, r.raw.key), lambda r: r.live.id),
                                 REFUSED + "another tunnel", "another tunnel"),
    "hello-wrong-version": (attack_tls(lambda r: (r.raw.cert, r.raw.key), version=2),
                            REFUSED + "version 2 not supported", "version 2 not supported"),
    "hello-wrong-kind": (attack_tls(lambda r: (r.raw.cert, r.raw.key), kind="data"),
                         REFUSED + "kind", "kind"),
    "hello-not-json": (attack_greeting(lambda m: m.encode_frame(m.Msg.HELLO, 0, b"\xff{")),
                       REFUSED + "not JSON", None),
    "first-frame-data": (attack_greeting(lambda m: m.encode_frame(m.Msg.DATA, 1, b"x")),
                         REFUSED + "not HELLO", None),
    "first-frame-oversized": (attack_greeting(lambda m: m.FRAME_HEADER.pack(
        m.Msg.HELLO, 0, m.MAX_FRAME_BYTES + 1) + b"{" * 1000), REFUSED + "bad first frame", None),
    "first-frame-server-type": (attack_greeting(lambda m: m.encode_control(m.Msg.WELCOME, {})),
                                REFUSED + "bad first frame", None),
    "oversized-frame": (attack_session(lambda m, s: m.FRAME_HEADER.pack(
        m.Msg.DATA, 1, m.MAX_FRAME_BYTES + 1) + b"x" * 65536), BROKE + "exceeds the limit",
        "exceeds the limit"),
    "data-for-unknown-stream": (attack_session(lambda m, s: m.encode_frame(m.Msg.DATA, 7, b"x")),
                                BROKE + "unknown stream 7", "unknown stream 7"),
    "window-for-unknown-stream": (attack_session(lambda m, s: m.encode_frame(
        m.Msg.WINDOW, 3, m.U32.pack(10))), BROKE + "unknown stream 3", "unknown stream 3"),
    "eof-for-unknown-stream": (attack_session(lambda m, s: m.encode_frame(m.Msg.EOF, 9)),
                               BROKE + "unknown stream 9", "unknown stream 9"),
    "server-frame-from-pod": (attack_session(lambda m, s: m.FRAME_HEADER.pack(4, 1, 2) + b"\0P"),
                              BROKE + "unexpected frame type 4", "unexpected frame type 4"),
    "second-hello": (attack_session(lambda m, s: m.encode_control(m.Msg.HELLO, {
        "kind": "control", "version": 1})), BROKE + "unexpected HELLO", "unexpected HELLO"),
    "control-not-json": (attack_session(lambda m, s: m.encode_frame(m.Msg.GOAWAY, 0, b"\xff")),
                         BROKE + "not JSON", "not JSON"),
    "data-on-stream-0": (attack_session(lambda m, s: m.encode_frame(m.Msg.DATA, 0, b"[1]")),
                         BROKE + "(not a JSON object|unexpected DATA)", None),
    "data-beyond-window": (attack_beyond_window, BROKE + "beyond the window", "beyond the window"),
    "data-after-eof": (attack_session(lambda m, s: m.encode_frame(m.Msg.EOF, s)
                                      + m.encode_frame(m.Msg.DATA, s, b"late"), True),
                       BROKE + "data after EOF", "data after EOF"),
    "window-past-its-size": (attack_session(lambda m, s: m.encode_frame(
        m.Msg.WINDOW, s, m.U32.pack(1)), True), BROKE + "window grew", "window grew"),
    "window-bad-payload": (attack_session(lambda m, s: m.encode_frame(m.Msg.WINDOW, s, b"abc"),
                                          True), BROKE + "bad WINDOW", "bad WINDOW"),
}


@pytest.mark.parametrize("name", list(TUNNEL_ATTACKS))
def test_tunnel_port_attack_closed_with_reason_and_others_unaffected(relay, server_mod, name):
    attack, log_pattern, told = TUNNEL_ATTACKS[name]
    mark = relay.server.mark()
    start = time.monotonic()
    port, events = attack(server_mod, relay)
    seconds = time.monotonic() - start
    line = relay.server.wait_log(log_pattern.format(port=port, raw=relay.raw.id), mark, 5.0)
    report("tunnel", name, "closed: " + line.group(0).split(" reason=", 1)[1][:70], seconds)
    assert seconds < 6, seconds
    if told:  # the pod is told why, in the REJECT or GOAWAY before the close
        reasons = [json.loads(p.decode()).get("reason", "") for m, s, p in events or []
                   if m in (server_mod.Msg.REJECT, server_mod.Msg.GOAWAY)]
        assert any(told in reason for reason in reasons), events
    assert_live_tunnel_unaffected(relay)
    relay.server.assert_up()


# Attacks made with the raw tunnel's own certificate, each of which ends its session.
BANNABLE_ATTACKS = ("garbage-bytes", "hello-for-another-tunnel", "hello-wrong-version",
                    "second-hello", "oversized-frame", "data-beyond-window")


def test_tunnel_port_raw_pod_still_welcome_after_the_attacks(relay, server_mod):
    """The attacks ban nobody: right after the raw tunnel's own certificate was
    used for each of them, it still gets a session, and a consumer through it
    reaches the raw pod. The attacks run here, so the test needs no other."""
    for name in BANNABLE_ATTACKS:
        attack, log_pattern, _told = TUNNEL_ATTACKS[name]
        mark = relay.server.mark()
        port, _events = attack(server_mod, relay)
        relay.server.wait_log(log_pattern.format(port=port, raw=relay.raw.id), mark, 5.0)
    pod = welcomed(server_mod, relay)
    stream = opened_stream(server_mod, relay, pod)
    pod.consumer.sendall(b"ping")
    event = pod.next_event(5.0, server_mod.Msg.DATA)
    assert event == (server_mod.Msg.DATA, stream, b"ping"), event
    pod.consumer.close()
    pod.close()
    assert_live_tunnel_unaffected(relay)


@pytest.mark.slow
def test_tunnel_port_silent_and_slow_greetings_closed_by_the_hello_deadline(relay, server_mod):
    """Nothing sent, a TLS handshake or a HELLO one byte per second: each is
    closed within the server's --hello-timeout (plus slack) with a logged reason."""
    mod, mark = server_mod, relay.server.mark()
    tunnel = relay.server.tunnel
    hello = mod.encode_control(mod.Msg.HELLO, {"kind": "control", "version": 1,
                                               "tunnel": relay.raw.id})
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(relay.raw.cacert)
    context.load_cert_chain(relay.raw.cert, relay.raw.key)
    clients = {
        "silent-tcp": Trickler(tunnel, source=None, max_s=30),
        "client-hello-1-byte-per-s": Trickler(tunnel, rest=client_hello(DOMAIN), source=None,
                                              max_s=30),
        "tls-then-silent": Trickler(tunnel, tls=context, server_hostname=DOMAIN, source=None,
                                    max_s=30),
        "hello-1-byte-per-s": Trickler(tunnel, rest=hello, tls=context, server_hostname=DOMAIN,
                                       source=None, max_s=30),
    }
    bound = HELLO_DEADLINE_S + SLACK_S
    for client in clients.values():
        assert client.connected.wait(10)
    consumer_round_trip(relay)  # while they hang on
    for name, client in clients.items():
        client.join(bound + 5)
        report("tunnel", name, "closed", client.closed_after)
        assert client.closed_after is not None and client.closed_after <= bound, \
            (name, client.closed_after)
    failed = relay.server.log_count(r"pod (handshake failed|refused) pod=127\.0\.0\.1:\d+ "
                                    r"reason=.*(timed out|not complete)", mark)
    assert failed >= len(clients), relay.server.proc.stderr()[mark:]
    assert_live_tunnel_unaffected(relay)


# =====================================================================================
# 10. Fronts: broken ClientHellos, HTTP without Host or with 1,000 headers
# =====================================================================================

@pytest.mark.slow
def test_front_broken_client_hellos_closed_in_bounded_time(relay):
    server = relay.server
    full = client_hello(relay.live.fqdn)
    cases = {  # name: (bytes, then half-close, bound on the close)
        "hello-truncated-half": (full[:len(full) // 2], False, HEAD_DEADLINE_S + SLACK_S),
        "hello-truncated-half-then-fin": (full[:len(full) // 2], True, HEAD_DEADLINE_S + SLACK_S),
        "hello-truncated-3-bytes": (full[:3], False, HEAD_DEADLINE_S + SLACK_S),
        "hello-huge-alpn-20kb": (client_hello(relay.live.fqdn, ["p%03d" % i + "x" * 196
                                                               for i in range(100)]),
                                 False, HEAD_DEADLINE_S + SLACK_S),
        "hello-record-64kb-claimed": (b"\x16\x03\x01\xff\xff\x01" + os.urandom(20000), False,
                                      2.0),
        "hello-record-of-junk": (b"\x16\x03\x01\x40\x00" + os.urandom(16384), False, 2.0),
        "hello-not-a-hello": (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", False, 2.0),
        "hello-sni-unknown": (client_hello("no-such-tunnel." + DOMAIN), False, 2.0),
        "hello-sni-not-ascii": (client_hello("a" * 12 + "." + DOMAIN).replace(
            b"a" * 12, b"\xff" * 12), False, 2.0),
        "hello-sni-of-tunnel-without-https": (client_hello(relay.raw.fqdn), False, 2.0),
        "hello-without-sni-then-silence": (client_hello(None), False, API_DEADLINE_S + SLACK_S),
        "not-tls-at-all": (b"GET / HTTP/1.0\r\n\r\n", False, 2.0),
    }
    results = {}

    def run(name, data, fin, bound):
        start = time.monotonic()
        with connect(server.https) as sock:
            sock.sendall(data)
            if fin:
                sock.shutdown(socket.SHUT_WR)
            try:
                answer = read_until_closed(sock, bound)
                results[name] = (time.monotonic() - start, answer)
            except AssertionError as exc:
                results[name] = (None, str(exc))
    threads = [threading.Thread(target=run, args=(name,) + case) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for name, (seconds, answer) in sorted(results.items()):
        report("front/https", name, "closed" if seconds is not None else answer, seconds)
    assert set(results) == set(cases)
    assert all(seconds is not None for seconds, _ in results.values()), results
    assert_live_tunnel_unaffected(relay)
    server.assert_up()


def test_front_client_hello_without_sni_reaches_only_the_api(relay):
    """A real TLS client without SNI (by IP address) gets the API, which
    answers an unknown path with 404; the pod's https service is never reached."""
    server = relay.server
    status, answer, seconds = exchange(server.https, b"GET /no-such-page HTTP/1.0\r\n\r\n",
                                       server.tls_context(), "127.0.0.1")
    report("front/https", "real-client-without-sni", status, seconds)
    assert status == 404, answer[:300]
    assert_api_error(answer)


@pytest.mark.slow
def test_front_http_without_host_or_with_1000_headers(relay):
    server, fqdn = relay.server, relay.live.fqdn.encode()
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    many_long = b"".join(b"X-Header-%04d: value\r\n" % i for i in range(1000))
    cases = {  # name: (request, statuses allowed)
        "http/1.1-without-host": (b"GET /config HTTP/1.1\r\n\r\n", {400}),
        "http/1.0-without-host": (b"GET /no-such-page HTTP/1.0\r\n\r\n", {404}),
        "host-empty": (b"GET /no-such-page HTTP/1.0\r\nHost: \r\n\r\n", {404}),
        "host-unknown-tunnel": (b"GET / HTTP/1.0\r\nHost: no-such-tunnel.%s\r\n\r\n"
                                % DOMAIN.encode(), {404}),
        "api-1000-headers": (b"GET /config HTTP/1.0\r\nHost: %s\r\n" % DOMAIN.encode() + many
                             + b"\r\n", {431}),
        "tunnel-1000-headers-over-16kb": (b"GET / HTTP/1.0\r\nHost: " + fqdn + b"\r\n" + many_long
                                          + b"\r\n", {431}),
        "no-host-1000-headers": (b"GET /config HTTP/1.0\r\n" + many + b"\r\n", {431}),
        "head-never-ends": (b"GET / HTTP/1.0\r\nHost: " + fqdn + b"\r\n", {408}),
    }
    wrong = []
    for name, (request, allowed) in sorted(cases.items()):
        status, answer, seconds = exchange(server.http, request,
                                           within_s=HEAD_DEADLINE_S + SLACK_S)
        report("front/http", name, status or "closed", seconds)
        assert_api_error(answer)
        if status not in allowed:
            wrong.append((name, status, answer[:200]))
    assert not wrong, wrong
    # under 16 KiB, 1,000 headers for a tunnel are the pod's business: relayed untouched
    status, answer, seconds = exchange(server.http, b"GET /many HTTP/1.0\r\nHost: " + fqdn
                                       + b"\r\n" + many + b"\r\n")
    report("front/http", "tunnel-1000-headers-under-16kb", "relayed, pod said %s" % status,
           seconds)
    assert status == 200 and b"GET /many HTTP/1.0" in answer, answer[:300]
    assert_live_tunnel_unaffected(relay)
    server.assert_up()


# =====================================================================================
# 11. Certificate requests: only the tunnel's own name, never a CA, nothing else signed
# =====================================================================================

def hostile_csrs(workdir, fqdn, other_fqdn, ca_pem):
    ec = make_key(os.path.join(workdir, "ec.key"), "ec256")
    rsa_1024 = make_key(os.path.join(workdir, "rsa1024.key"), "rsa1024")
    rsa_512 = make_key(os.path.join(workdir, "rsa512.key"), "rsa512")
    p192 = make_key(os.path.join(workdir, "p192.key"), "p192")
    k256 = make_key(os.path.join(workdir, "k256.key"), "secp256k1")
    ed448 = make_key(os.path.join(workdir, "ed448.key"), "ed448")
    cn = "/CN=" + fqdn
    good = make_csr(ec, cn)
    body = "".join(good.splitlines()[1:-1])
    der = ssl.PEM_cert_to_DER_cert(good.replace("CERTIFICATE REQUEST", "CERTIFICATE"))
    broken = ssl.DER_cert_to_PEM_cert(der[:-3] + bytes([der[-3] ^ 1]) + der[-2:]).replace(
        "CERTIFICATE", "CERTIFICATE REQUEST")
    return {
        "other-name": make_csr(ec, "/CN=evil." + DOMAIN),
        "other-tunnels-name": make_csr(ec, "/CN=" + other_fqdn),
        "bare-domain": make_csr(ec, "/CN=" + DOMAIN),
        "wildcard": make_csr(ec, "/CN=*." + DOMAIN),
        "san-other-name": make_csr(ec, cn, "subjectAltName=DNS:evil." + DOMAIN),
        "san-extra-dns": make_csr(ec, cn, "subjectAltName=DNS:%s,DNS:evil.example" % fqdn),
        "san-wildcard": make_csr(ec, cn, "subjectAltName=DNS:%s,DNS:*.%s" % (fqdn, DOMAIN)),
        "san-ip": make_csr(ec, cn, "subjectAltName=DNS:%s,IP:127.0.0.1" % fqdn),
        "san-email": make_csr(ec, cn, "subjectAltName=DNS:%s,email:a@evil.example" % fqdn),
        "san-uri": make_csr(ec, cn, "subjectAltName=DNS:%s,URI:https://evil.example/" % fqdn),
        "cn-injection-comma": make_csr(ec, cn + ",DNS:evil.example"),
        "cn-injection-slash": make_csr(ec, cn + "\\/CN=evil.example"),
        "cn-twice": make_csr(ec, cn + "/CN=evil.example"),
        "subject-extra-o": make_csr(ec, cn + "/O=Evil Corp"),
        "subject-empty": make_csr(ec, "/", "subjectAltName=DNS:" + fqdn),
        "ca-true": make_csr(ec, cn, "basicConstraints=critical,CA:TRUE"),
        "ca-true-pathlen": make_csr(ec, cn, "basicConstraints=CA:TRUE,pathlen:0"),
        "weak-rsa-1024": make_csr(rsa_1024, cn),
        "weak-rsa-512": make_csr(rsa_512, cn),
        "weak-ec-p192": make_csr(p192, cn),
        "ec-secp256k1": make_csr(k256, cn),
        "ed448": make_csr(ed448, cn),
        "bad-signature": broken,
        "garbage-text": "this is not a certificate request",
        "garbage-binary-latin1": os.urandom(600).decode("latin-1"),
        "pem-bad-base64": "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        "pem-truncated": good[:len(good) // 2],
        "pem-two-csrs": good + good,
        "pem-ca-certificate-instead": ca_pem,
        "pem-private-key-instead": open(ec).read(),
        "pem-der-base64-only": body,
        "pem-60kb": good.replace("\n-----END", "\n" + "A" * 60000 + "\n-----END"),
        "empty": "",
    }


def test_cert_hostile_csrs_refused_and_every_issued_cert_is_exact(api_server, tmp_path):
    server = api_server
    workdir = str(tmp_path)
    status, tunnel = create_tunnel(server, MAIN_TOKEN, ["https"])
    assert status == 201, tunnel
    url = "/tunnels/%s/cert" % tunnel["id"]
    with open(server.cafile) as fh:
        csrs = hostile_csrs(workdir, tunnel["fqdn"], server.victim["fqdn"], fh.read())
    signed = {case: csrs.pop(case) for case in SIGNED_EXACT}
    issued_before = server.snapshot()
    wrong = []
    for case, csr in sorted(csrs.items()):
        start = time.monotonic()
        status, body = api_call(server, "POST", url, {"csr": csr}, secret=tunnel["secret"])
        report("cert", case, "%s %s" % (status, str(body.get("error", ""))[:60]),
               time.monotonic() - start)
        if status != 400 or "error" not in body:
            wrong.append((case, status, body))
    status, body = api_call(server, "POST", url, raw=json.dumps(
        {"csr": "A" * (1 << 20)}).encode(), secret=tunnel["secret"])
    report("cert", "one-megabyte", status)
    if status != 413:
        wrong.append(("one-megabyte", status, body))
    # the victim's name from this tunnel's secret, this tunnel's name for the victim's id
    ec = make_key(os.path.join(workdir, "ec.key"), "ec256")
    for case, path, csr, secret, expected in (
            ("own-csr-to-victim-without-its-secret", "/tunnels/%s/cert" % server.victim["id"],
             make_csr(ec, "/CN=" + tunnel["fqdn"]), tunnel["secret"], 401),):
        status, body = api_call(server, "POST", path, {"csr": csr}, secret=secret)
        report("cert", case, status)
        if status != expected:
            wrong.append((case, status, body))
    assert not wrong, wrong
    assert server.snapshot() == issued_before, "a refused request changed the state"
    # whatever else a CSR asks (other names, SANs, CA:TRUE, key usages, name
    # constraints), the leaf is signed for this tunnel's name only, and nothing more
    signed["csr-for-victim-with-own-secret"] = make_csr(ec, "/CN=" + server.victim["fqdn"])
    for case, extra in (("good", ()), ("asks-key-cert-sign", ("keyUsage=keyCertSign,cRLSign",)),
                        ("asks-name-constraints", ("nameConstraints=permitted;DNS:evil.example",))):
        signed[case] = make_csr(ec, "/CN=" + tunnel["fqdn"], *extra)
    for case, csr in sorted(signed.items()):
        status, body = api_call(server, "POST", url, {"csr": csr}, secret=tunnel["secret"])
        report("cert", case, "%s (signed, extras dropped)" % status)
        if case in SIGNED_OR_REFUSED and status == 400:
            continue
        assert status == 200, (case, body)
        assert_leaf_exact(workdir, body["cert"], tunnel["fqdn"])
    assert_issued_certs_exact(server)
    server.assert_up()


SIGNED_EXACT = ("other-name", "other-tunnels-name", "bare-domain", "wildcard", "san-other-name",
                "san-extra-dns", "san-wildcard", "san-ip", "san-email", "san-uri",
                "cn-injection-comma", "cn-injection-slash", "cn-twice", "subject-extra-o",
                "subject-empty", "ca-true", "ca-true-pathlen",
                "pem-60kb")
# openssl reads the CSR and ignores what follows it, unless the CSR's own
# base64 ended in padding: then the "A"s after it are a bad decode
SIGNED_OR_REFUSED = ("pem-60kb",)


def assert_leaf_exact(workdir, pem, fqdn):
    path = os.path.join(workdir, "leaf.pem")
    with open(path, "w") as fh:
        fh.write(pem)
    fields = cert_fields(path)
    assert fields["subject"] == "CN=" + fqdn, fields
    assert fields["Subject Alternative Name"] == "DNS:" + fqdn, fields
    assert fields["Basic Constraints"] == "CA:FALSE", fields
    assert "Certificate Sign" not in fields.get("Key Usage", "") and "Name Constraints" not in fields


def assert_issued_certs_exact(server):
    """Every certificate in STATE_DIR/ca/issued names exactly one tunnel's FQDN
    (the one whose record holds its fingerprint) and is no CA; the one
    exception is the server's own certificate."""
    records = {}
    for name in os.listdir(os.path.join(server.state_dir, "tunnels")):
        with open(os.path.join(server.state_dir, "tunnels", name)) as fh:
            record = json.load(fh)
        records.update({fp: record for fp in record["cert_sha256"]})
    own = cert_sha256(os.path.join(server.state_dir, "ca", "server.pem"))
    issued_dir = os.path.join(server.state_dir, "ca", "issued")
    leaves = 0
    for name in sorted(os.listdir(issued_dir)):
        path = os.path.join(issued_dir, name)
        fingerprint = cert_sha256(path)
        if fingerprint == own:
            continue
        fields = cert_fields(path)
        record = records.get(fingerprint)
        assert record is not None, "issued %s belongs to no tunnel: %s" % (name, fields)
        assert fields["subject"] == "CN=" + record["fqdn"], fields
        assert fields["Subject Alternative Name"] == "DNS:" + record["fqdn"], fields
        assert fields["Basic Constraints"] == "CA:FALSE", fields
        assert "Certificate Sign" not in fields.get("Key Usage", ""), fields
        assert "Name Constraints" not in fields, fields
        leaves += 1
    report("cert", "issued-certificates-inspected", "%d leaves, all exact" % leaves)
    assert leaves >= 3


# =====================================================================================
# 12. Tokens: bad tokens are rate-limited per address; a unique token is used once
# =====================================================================================

def test_token_bad_ones_rate_limited_per_address(api_server, server_mod):
    server = api_server
    before = set(os.listdir(os.path.join(server.state_dir, "tunnels")))
    limit = server_mod.BAD_TOKEN_LIMIT
    statuses = [create_tunnel(server, "wrong-token-%d" % i, source="127.0.0.2")[0]
                for i in range(limit)]
    assert statuses == [403] * limit
    for case, token, tls, source in (("bad-again", "wrong", False, "127.0.0.2"),
                                     ("good-token-same-address", MAIN_TOKEN, False, "127.0.0.2"),
                                     ("good-token-over-https", MAIN_TOKEN, True, "127.0.0.2")):
        status, body = api_call(server, "POST", "/tunnels", {"token": token, "protocols": ["tcp"]},
                                source=source, tls=tls)
        report("token", case + " from 127.0.0.2", status)
        assert status == 429 and "error" in body, body
    status, body = api_call(server, "POST", "/tunnels/%s/extend" % server.victim["id"],
                            {"token": MAIN_TOKEN}, secret=server.victim["secret"],
                            source="127.0.0.2")
    assert status == 429, body
    assert set(os.listdir(os.path.join(server.state_dir, "tunnels"))) == before
    # other addresses are not affected
    status, body = create_tunnel(server, "wrong-token", source="127.0.0.3")
    report("token", "bad-token from 127.0.0.3", status)
    assert status == 403, body
    status, body = create_tunnel(server, MAIN_TOKEN, source="127.0.0.3")
    report("token", "good-token from 127.0.0.3", status)
    assert status == 201, body
    status, body = create_tunnel(server, MAIN_TOKEN, source="127.0.0.1")
    assert status == 201, body
    server.assert_up()


def test_token_unique_under_50_parallel_creations_succeeds_once(api_server):
    server = api_server
    before = set(os.listdir(os.path.join(server.state_dir, "tunnels")))
    barrier = threading.Barrier(50)
    results = [None] * 50

    def worker(index):
        barrier.wait(timeout=20)
        try:
            # ten addresses: one address gets only a share of the API's workers
            results[index] = create_tunnel(server, UNIQUE_TOKEN,
                                           source="127.0.0.%d" % (40 + index % 10))
        except OSError as exc:
            results[index] = (None, repr(exc))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(str(status) for status, _ in results)
    report("token", "unique-token-50-parallel", " ".join(
        "%s x%d" % (s, statuses.count(s)) for s in sorted(set(statuses))))
    assert statuses.count("201") == 1 and statuses.count("403") == 49, results
    created = set(os.listdir(os.path.join(server.state_dir, "tunnels"))) - before
    winner = [body for status, body in results if status == 201][0]
    assert created == {winner["id"] + ".json"}
    with open(os.path.join(server.state_dir, "used_tokens.json")) as fh:
        assert hashlib.sha256(UNIQUE_TOKEN.encode()).hexdigest() in json.load(fh)["used"]
    server.assert_up()


# =====================================================================================
# Abuse brakes: each cap closes cleanly with one log line per refusal
# =====================================================================================

BRAKE_FLAGS = ["--max-streams-per-tunnel", "3", "--max-tunnels-per-token", "2",
               "--stream-idle-timeout", "2", "--max-pending-front", "4",
               "--max-pending-handshakes", "3"]


@pytest.fixture(scope="module")
def brakes(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("brakes"))
    server = Server(workdir, BRAKE_FLAGS, ["%s = max_ports:1 lifespan:1h" % CAP_TOKEN])
    r = Relay()
    r.server, r.workdir = server, workdir
    r.live = PodIdentity(server, os.path.join(workdir, "live"), "tcp")
    r.raw = PodIdentity(server, os.path.join(workdir, "raw"), "tcp")
    r.pod = start_pod(workdir, r.live.dir, "--echo", name="live-pod")
    yield r
    assert r.pod.stop() == 0
    assert server.stop() == 0


def echo_stream(brakes):
    """A consumer connection through the live tunnel that has echoed once."""
    sock = connect(brakes.live.ports["tcp"], timeout=5)
    sock.sendall(b"hello")
    assert sock.recv(16) == b"hello"
    return sock


def refused_at_once(port, within_s=2.0):
    sock = connect(port, timeout=within_s)
    try:
        sock.sendall(b"x")
    except OSError:
        pass
    start = time.monotonic()
    answer = read_until_closed(sock, within_s)
    sock.close()
    return answer, time.monotonic() - start


def test_brake_streams_per_tunnel(brakes):
    server, mark = brakes.server, brakes.server.mark()
    streams = [echo_stream(brakes) for _ in range(3)]
    try:
        for _ in range(2):
            answer, seconds = refused_at_once(brakes.live.ports["tcp"])
            report("brake", "4th-stream-on-a-cap-of-3", "closed, %r" % answer, seconds)
            assert answer == b""
        assert server.log_count(r"stream cap reached tunnel=%s cap=3" % brakes.live.id, mark) == 2
        for sock in streams:
            sock.sendall(b"again")
            assert sock.recv(16) == b"again"  # the streams under the cap go on
    finally:
        streams.pop().close()
    wait_until(lambda: stream_count(server) == 2, timeout=5, what="the closed stream to go")
    streams.append(echo_stream(brakes))  # room again
    for sock in streams:
        sock.close()


def stream_count(server):
    status, text = api_call(server, "GET", "/metrics")
    return int(re.search(rb"^pipe2me_streams_open (\d+)$", text, re.M).group(1))


def test_brake_tunnels_per_token(brakes):
    server, mark = brakes.server, brakes.server.mark()
    made = [create_tunnel(server, CAP_TOKEN) for _ in range(2)]
    assert [status for status, _ in made] == [201, 201], made
    before = server.snapshot()
    status, body = create_tunnel(server, CAP_TOKEN)
    report("brake", "3rd-tunnel-on-a-cap-of-2", "%s %s" % (status, body.get("error")))
    assert status == 403 and "MAX_TUNNELS_PER_TOKEN" in body["error"], body
    assert server.snapshot() == before
    assert server.log_count(r"tunnel cap reached token_sha256=\w+ cap=2", mark) == 1
    status, body = api_call(server, "DELETE", "/tunnels/" + made[0][1]["id"],
                            secret=made[0][1]["secret"])
    assert status == 200, body
    status, body = create_tunnel(server, CAP_TOKEN)  # a deleted tunnel frees its place
    assert status == 201, body


@pytest.mark.slow
def test_brake_idle_stream_closed_after_the_timeout(brakes):
    server, mark = brakes.server, brakes.server.mark()
    idle, busy = echo_stream(brakes), echo_stream(brakes)
    start = time.monotonic()
    closed = []

    def idle_waits():
        closed.append((read_until_closed(idle, 10.0), time.monotonic() - start))
    waiter = threading.Thread(target=idle_waits)
    waiter.start()
    # the busy one talks every half second until the idle one is closed and a sweep (1 s)
    # has passed the 2 s since both opened
    while not closed or time.monotonic() - start < 3.0:
        assert time.monotonic() - start < 10.0, "the idle stream was never closed"
        busy.sendall(b"tick")
        assert busy.recv(16) == b"tick"
        time.sleep(0.5)  # the busy stream's pace: it stays active while the idle one times out
    waiter.join(10)
    answer, seconds = closed[0]
    report("brake", "idle-stream-timeout-2s", "closed", seconds)
    assert answer == b"" and 2.0 <= seconds <= 2.0 + SLACK_S, closed
    busy.sendall(b"still")
    assert busy.recv(16) == b"still"
    assert server.log_count(r"stream idle timeout tunnel=%s stream=\d+" % brakes.live.id,
                            mark) == 1
    busy.close()
    idle.close()


def test_brake_pending_front_connections(brakes):
    """Each front has its own budget: 4 pending on the HTTP front fill it,
    the HTTPS front still takes 4 of its own."""
    server, mark = brakes.server, brakes.server.mark()
    pending = [connect(server.http) for _ in range(4)]
    for sock in pending:
        sock.sendall(b"GET /config HTTP/1.0\r\n")  # a head that is not finished
    refused = []  # the first on the same listener: accepted after the four
    for port in (server.http, server.http):
        answer, seconds = refused_at_once(port)
        refused.append(seconds)
        assert answer == b""
    report("brake", "5th-pending-on-a-cap-of-4", "closed", max(refused))
    assert server.log_count(r"pending cap reached, consumer closed front=http "
                            r"from=127\.0\.0\.1:\d+ cap=4", mark) == 2
    tls_pending = [connect(server.https) for _ in range(4)]
    for sock in tls_pending:
        sock.sendall(b"\x16\x03\x01")  # a ClientHello that is not finished
    answer, _seconds = refused_at_once(server.https)
    assert answer == b""
    assert server.log_count(r"pending cap reached, consumer closed front=https", mark) == 1
    for sock in tls_pending:
        sock.close()
    for sock in pending:  # the pending ones finish their heads and are served
        sock.sendall(b"Host: %s\r\n\r\n" % DOMAIN.encode())
        assert status_of(read_until_closed(sock, 5.0)) == 200
        sock.close()
    status, _ = api_call(server, "GET", "/config")
    assert status == 200


def test_brake_pending_pod_handshakes(brakes, server_mod):
    server, mark = brakes.server, brakes.server.mark()
    silent = [connect(server.tunnel) for _ in range(3)]
    refused = []
    for _ in range(2):
        answer, seconds = refused_at_once(server.tunnel)
        refused.append(seconds)
        assert answer == b""
    report("brake", "4th-handshake-on-a-cap-of-3", "closed", max(refused))
    assert server.log_count(r"pod handshake cap reached, closing pod=127\.0\.0\.1:\d+ cap=3",
                            mark) == 2
    for sock in silent:
        sock.close()
    wait_until(lambda: server.log_count(r"pod handshake failed", mark) >= 3, timeout=5,
               what="the silent handshakes to end")
    echo_stream(brakes).close()  # the live pod was never disturbed
    pod = welcomed(server_mod, brakes)  # the slots are free again: a pod gets in
    pod.close()


def test_brake_keys_documented_in_the_example_config(server_mod):
    example = os.path.join(os.path.dirname(POD), "pipe2me.server.conf.example")
    with open(example, encoding="utf-8") as fh:
        text = fh.read()
    for key in ("MAX_STREAMS_PER_TUNNEL", "MAX_TUNNELS_PER_TOKEN", "STREAM_IDLE_TIMEOUT",
                "MAX_PENDING_FRONT", "MAX_PENDING_HANDSHAKES", "FRONT_HEAD_DEADLINE",
                "API_REQUEST_DEADLINE"):
        assert key in server_mod.CONFIG_KEYS
        match = re.search(r"^%s=(.*)$" % key, text, re.M)
        assert match, key
        assert match.group(1) == server_mod.CONFIG_KEYS[key][0], key
