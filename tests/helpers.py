"""One kit for every test module: the API client, and openssl for keys, CSRs
and certificate fields. Fixtures and processes stay in conftest.py.

    api(server, "POST", "/tunnels", {"token": t, "protocols": ["tcp"]})
    request("https://127.0.0.1:8443/config", context=ctx)
    make_csr(make_key(path), "/CN=" + fqdn, "subjectAltName=DNS:" + fqdn)
    cert_fields(pem_or_path)["Subject Alternative Name"]

Requests go straight to the address in the URL (http.client: never through a
proxy of this machine), optionally from a given source address, so tests can
play clients on several loopback addresses."""

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse

DOMAIN = "pipe2.localhost"


# ---- the API -----------------------------------------------------------------------

class Answer:
    """One HTTP answer: status, content type, raw body and headers."""

    def __init__(self, status, ctype, body, headers):
        self.status, self.ctype, self.body, self.headers = status, ctype, body, headers

    def json(self):
        """The body as JSON; fails the test when the answer is not JSON."""
        assert "application/json" in self.ctype, (self.status, self.ctype, self.body[:300])
        return json.loads(self.body.decode())

    def pair(self):
        """(status, JSON object), or (status, raw bytes) for an answer that is not JSON."""
        if "application/json" in self.ctype:
            return self.status, self.json()
        return self.status, self.body


def request(url, method="GET", body=None, secret=None, raw=None, source=None, host=None,
            context=None, timeout=20.0, headers=None):
    """One request to `url`: `body` is sent as JSON, `raw` bytes as they are (both
    labelled JSON unless `headers` say otherwise); `secret` as a bearer token;
    `host` overrides the Host header; `source` is the local address."""
    parts = urllib.parse.urlsplit(url)
    address = (source, 0) if source else None
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           source_address=address, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout,
                                          source_address=address)
    sent = dict(headers or {})
    if host:
        sent["Host"] = host
    data = json.dumps(body).encode() if body is not None else raw
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    if secret:
        sent["Authorization"] = "Bearer " + secret
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request(method, target, body=data, headers=sent)
        answer = conn.getresponse()
        payload = answer.read()
    finally:
        conn.close()
    return Answer(answer.status, answer.getheader("Content-Type") or "", payload, answer.headers)


def request_json(url, method="GET", body=None, **options):
    """(status, JSON object) of one request; fails the test when the answer is not JSON."""
    answer = request(url, method, body, **options)
    return answer.status, answer.json()


def api(server, method, path, body=None, tls=False, **options):
    """One API request to a running server (a conftest ServerHandle) through its
    HTTP front, or its HTTPS front with tls=True (verified with the server's CA)."""
    if tls:
        options.setdefault("context", server_tls_context(server))
        url = "https://127.0.0.1:%d%s" % (server.https, path)
    else:
        url = "http://127.0.0.1:%d%s" % (server.http, path)
    return request(url, method, body, **options)


def server_tls_context(server):
    """A client context that trusts the server's own CA."""
    return ssl.create_default_context(cafile=os.path.join(server.state_dir, "ca", "ca.pem"))


def create_tunnel(server, token, protocols=("tcp",), **options):
    """POST /tunnels: (status, JSON answer)."""
    answer = api(server, "POST", "/tunnels", {"token": token, "protocols": list(protocols)},
                 **options)
    return answer.status, answer.json()


# ---- openssl: keys, CSRs, certificate fields ----------------------------------------

KEY_ARGS = {
    "ec256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "ec384": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ec521": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
    "p192": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime192v1"],
    "secp256k1": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
    "rsa2048": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "rsa1024": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
    "rsa512": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512"],
    "ed25519": ["-algorithm", "ED25519"],
    "ed448": ["-algorithm", "ED448"],
    "rsapss": ["-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048"],
}


def accepts(port, host="127.0.0.1", timeout=2):
    """Whether something accepts TCP connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def curl(*args, timeout=30):
    """Run the real curl (never through a proxy, no stdin, at most 20 s);
    the CompletedProcess, output in bytes."""
    return subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "20"] + list(args),
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def curl_ok(*args):
    """curl's stdout (bytes); the test fails with curl's message if curl failed."""
    done = curl(*args)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def openssl(*args, input_bytes=None, cwd=None):
    """Run openssl; its stdout, or the test fails with its stderr."""
    done = subprocess.run(["openssl"] + [str(a) for a in args], input=input_bytes, cwd=cwd,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def make_key(path, kind="ec256"):
    """A private key of `kind` (see KEY_ARGS) at `path`, made once; returns the path."""
    path = str(path)
    if not os.path.exists(path):
        openssl("genpkey", *KEY_ARGS[kind], "-out", path)
    return path


def make_csr(key, subject, *addext, outform="PEM"):
    """A CSR made by `openssl req` with this subject and these -addext values:
    PEM text, or DER bytes with outform="DER"."""
    args = ["req", "-new", "-key", key, "-config", os.devnull, "-subj", subject,
            "-outform", outform]
    for ext in addext:
        args += ["-addext", ext]
    out = openssl(*args)
    return out.decode() if outform == "PEM" else out


def first_pem_cert(pem_or_path):
    """The first CERTIFICATE block of PEM text or of a PEM file."""
    text = pem_or_path
    if "-----BEGIN" not in text:
        with open(text, encoding="ascii") as fh:
            text = fh.read()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return text[text.index("-----BEGIN CERTIFICATE-----"):end] + "\n"


def cert_sha256(pem_or_path):
    """SHA-256 (hex) of the first certificate's DER."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first_pem_cert(pem_or_path))).hexdigest()


CERT_EXTENSIONS = "subjectAltName,basicConstraints,keyUsage,extendedKeyUsage,nameConstraints"


def cert_fields(pem_or_path):
    """Fields of the first certificate as openssl prints them, without -text:
    subject (RFC 2253), serial, notBefore, notAfter (ISO 8601), and one entry
    per extension named as openssl names it ("Subject Alternative Name") with
    the line of its value; `critical` lists the extensions marked critical."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as fh:
        fh.write(first_pem_cert(pem_or_path))
        fh.flush()
        out = openssl("x509", "-in", fh.name, "-noout", "-subject", "-nameopt", "RFC2253",
                      "-serial", "-startdate", "-enddate", "-dateopt", "iso_8601",
                      "-ext", CERT_EXTENSIONS).decode()
    lines = [line.rstrip() for line in out.splitlines()]
    fields = {"critical": set()}
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith(" "):
            key, _, value = line.partition("=")
            fields[key] = value
        elif line.startswith("X509v3 "):
            name, _, flag = line[len("X509v3 "):].partition(":")
            fields[name] = lines[index + 1].strip()
            if "critical" in flag:
                fields["critical"].add(name)
    return fields


class RawPod:
    """A pod connection made by hand from the test process: TLS to the server's
    TUNNEL_PORT trusting `cacert`, with a client certificate if given, speaking
    the frame format of `mod` (the server script loaded as a module). It answers
    PING while it reads, as a pod does; until then it reads nothing. With
    `connected` (a TCP connection to TUNNEL_PORT made earlier) it greets
    through that one instead of dialing."""

    def __init__(self, mod, tunnel_port, cacert, cert=None, key=None, source=None,
                 rcvbuf=None, max_tls=None, timeout=10.0, connected=None):
        self.mod = mod
        self.send_timeout = timeout
        raw = connected or socket.socket()
        if connected is None:
            if rcvbuf:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            raw.bind((source or "127.0.0.1", 0))
            raw.settimeout(timeout)
            raw.connect(("127.0.0.1", tunnel_port))
        self.port = raw.getsockname()[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cacert)
        if max_tls:
            context.maximum_version = max_tls
        if cert:
            context.load_cert_chain(cert, key)
        self.decoder = mod.FrameDecoder(mod.SERVER_SENDS)
        self.events = []
        self.closed = False
        try:
            self.sock = context.wrap_socket(raw, server_hostname=DOMAIN)
        except (ssl.SSLError, OSError):
            self.sock, self.closed = raw, True

    def send(self, data):
        """Send all of `data` within the send timeout; False if the server has
        closed the connection (or took nothing for that long). Not within the
        last receive's timeout: a sendall cut short leaves half a TLS record."""
        try:
            self.sock.settimeout(self.send_timeout)
            self.sock.sendall(data)
            return True
        except (ssl.SSLError, OSError):
            return False

    def hello(self, tunnel_id, version=1, kind="control"):
        """Send HELLO; the server's first answer (msg, stream, payload), or None at close."""
        self.send(self.mod.encode_control(self.mod.Msg.HELLO, {
            "kind": kind, "version": version, "tunnel": tunnel_id}))
        return self.next_event(5.0)

    def next_event(self, within_s, want=None):
        """The next (msg, stream, payload) the server sends (of type `want`), or None at close."""
        end = time.monotonic() + within_s
        while True:
            for index, event in enumerate(self.events):
                if want is None or event[0] == want:
                    return self.events.pop(index)
            if self.closed:
                return None
            left = end - time.monotonic()
            assert left > 0, "nothing from the server within %.1f s" % within_s
            self.receive(left)

    def receive(self, timeout):
        """Read once (up to `timeout`), keeping the frames as events."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            return
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return
        for msg, stream, payload in self.decoder.frames(data):
            if msg == self.mod.Msg.PING:  # stay alive like a pod: HEARTBEAT_INTERVAL is 1 s
                self.send(self.mod.encode_frame(self.mod.Msg.PONG, 0, bytes(payload)))
            self.events.append((msg, stream, bytes(payload)))

    def closed_within(self, within_s):
        """Whether the server closes the connection within `within_s` (reading all)."""
        end = time.monotonic() + within_s
        while not self.closed and time.monotonic() < end:
            self.receive(max(0.01, end - time.monotonic()))
        return self.closed

    def until_closed(self, within_s=5.0):
        """Every event until the server closes; fails the test if it does not."""
        assert self.closed_within(within_s), \
            "the server kept the connection open for %.1f s" % within_s
        events, self.events = self.events, []
        return events

    def close(self):
        self.sock.close()


# ---- a peer that speaks broken or slow HTTP ---------------------------------------

class RawHttp:
    """A TCP (or TLS) server on 127.0.0.1 that answers every connection with
    `answer` bytes, its body (after the head, sent at once) a byte every
    `gap_s` seconds if set, and closes: a LAN host or a server that speaks
    broken HTTP, or trickles it."""

    def __init__(self, answer, gap_s=0, tls=None):
        self.answer, self.gap_s = answer, gap_s
        self.at_once = answer.find(b"\r\n\r\n") + 4 if gap_s else len(answer)  # the head
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http%s://127.0.0.1:%d" % ("s" if tls else "", self.listener.getsockname()[1])
        if tls:  # (certificate file, key file): the answer comes over TLS
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.listener = context.wrap_socket(self.listener, server_side=True)
        self.closed = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        """Accept connections until closed; each is answered in its own thread."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.answer_one, args=(conn,), daemon=True).start()

    def answer_one(self, conn):
        """Read the request (its body as long as Content-Length says), send the
        answer (trickled), close."""
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                head, _, body = conn.recv(65536).partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\ncontent-length: *(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    more = conn.recv(65536)
                    if not more:
                        break
                    body += more
                conn.sendall(self.answer[:self.at_once])
                for offset in range(self.at_once, len(self.answer)):
                    if self.closed.wait(self.gap_s):
                        return
                    conn.sendall(self.answer[offset:offset + 1])

    def close(self):
        """Stop listening and end every answer under way."""
        self.closed.set()
        self.listener.close()


def raises_within(call, error, seconds):
    """The text of the `error` that call() raises; the test fails if it raises
    nothing, or has not returned within `seconds` (it runs in a thread)."""
    outcome = []

    def run():
        try:
            call()
        except error as exc:
            outcome.append(str(exc))
        else:
            outcome.append(None)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "%s still running after %g s" % (call, seconds)
    assert outcome and outcome[0] is not None, "no %s raised" % error.__name__
    return outcome[0]


def self_signed(directory, name="127.0.0.1"):
    """(certificate file, key file) of a self-signed certificate for IP `name`."""
    key = make_key(os.path.join(directory, "self.key"))
    cert = os.path.join(directory, "self.pem")
    openssl("req", "-x509", "-new", "-key", key, "-config", os.devnull, "-subj", "/CN=" + name,
            "-addext", "subjectAltName=IP:" + name, "-days", "2", "-out", cert)
    return cert, key
