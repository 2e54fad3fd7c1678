"""Publishing services the way people run them (issue 12 points 2 and 3):
local targets other than 127.0.0.1:PORT, and the consumer's address handed to
raw TCP and TLS-passthrough services in a PROXY protocol header, read by a
real nginx and a real haproxy.

Local targets: a service bound to ::1 only (as Node.js binds `localhost`),
reached with a bare PORT, `[::1]:PORT` and `localhost:PORT`, through the
per-port URL, the Host-routed HTTP front and the SNI front; a failing target
is named in the pod's log; a LAN host in a second network namespace (behind
the pod, tests/nat_testbed.py) is reached the same three ways.

PROXY protocol: `setup --proxy-protocol v1`, then `update --proxy-protocol
v2` (the pod reconnects and the next streams carry v2), consumers over IPv4
and IPv6; nginx logs `$proxy_protocol_addr:$proxy_protocol_port`, haproxy
answers its `src` after `accept-proxy`, and both must equal curl's own
address. Compatibility: a pod of the original code still works with this
server (it gets OPEN frames without addresses) and this pod with the
original server.
"""

import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading

import pytest

from conftest import (POD, Proc, ServerHandle, clean_env, connect, echo_handler, echo_round_trip,
                      free_port, recv_to_eof,
                      free_port_range, pod_env, public_ports, read_head, run_pod, setup_pod,
                      start_pod, wait_until)
from helpers import curl_ok

BASE = "/work/base"  # the original code (commit df6c451), for compatibility tests


# ---- helpers ---------------------------------------------------------------

def http_answer(text):
    """A handler answering one HTTP request with `text`."""
    def handler(conn):
        if not read_head(conn):
            return
        body = text.encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
    return handler


def banner(text):
    def handler(conn):
        conn.sendall(text.encode())
    return handler


def read_banner(port, host="127.0.0.1"):
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.settimeout(10)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data.decode()
            data += chunk


def pod_cert(pod_dir):
    return (os.path.join(pod_dir, "pipe2me.openssl.cert"),
            os.path.join(pod_dir, "pipe2me.openssl.priv"))


def tls_banner(port, fqdn, cafile, host="127.0.0.1"):
    """Connect with SNI `fqdn`, verify the pod's certificate, read to EOF."""
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=fqdn) as tls:
            data = b""
            while True:
                try:
                    chunk = tls.recv(4096)
                except ssl.SSLError:
                    break
                if not chunk:
                    break
                data += chunk
            return data.decode()


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        proc.stop()


# ---- local targets ---------------------------------------------------------

def test_services_local_target_forms(pod_mod):
    parse = pod_mod.parse_targets
    got = parse("8100, 10.0.0.7:80,[::1]:8443,nas.lan:22,localhost:3000", "--local-ports")
    assert [(t.host, t.port) for t in got] == [
        (None, 8100), ("10.0.0.7", 80), ("::1", 8443), ("nas.lan", 22), ("localhost", 3000)]
    assert [str(t) for t in got] == ["8100", "10.0.0.7:80", "[::1]:8443", "nas.lan:22",
                                     "localhost:3000"]
    for bad in ("", "0", "70000", "::1:80", "[nas]:80", "host:", "a b:80", "[::1]", "x:y"):
        with pytest.raises(pod_mod.UsageError, match="bad port"):
            parse(bad, "--local-ports")
    # a bare port tries 127.0.0.1, then ::1
    assert [a[1][0] for a in got[0].addresses()] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("form", ["PORT", "[::1]:PORT", "localhost:PORT"])
def test_services_ipv6_only_service_three_ways(server, workdir, services, procs, form):
    """Services on ::1 only (Node.js's `localhost`), named as `form`: the
    per-port URLs, the HTTP front and the SNI front all reach them."""
    pod_dir = os.path.join(workdir, "pod")
    web = services(http_answer("http on ::1\n"), host="::1")
    tls_port = free_port()
    targets = [form.replace("PORT", str(port)) for port in (web.port, tls_port)]
    fqdn = setup_pod(server, pod_dir, "http,https", targets)
    services(banner("https on ::1\n"), port=tls_port, host="::1", tls=pod_cert(pod_dir))
    assert pod_env(pod_dir)["PIPE2ME_LOCAL_PORTS"] == ",".join(targets)
    procs.append(start_pod(workdir, pod_dir))
    http_port, https_port = public_ports(pod_dir)
    assert curl_ok("http://127.0.0.1:%d/" % http_port) == b"http on ::1\n"
    assert curl_ok("-H", "Host: " + fqdn, "http://127.0.0.1:%d/" % server.http) == b"http on ::1\n"
    cafile = os.path.join(pod_dir, "pipe2me.cacert")
    assert tls_banner(https_port, fqdn, cafile) == "https on ::1\n"
    assert tls_banner(server.https, fqdn, cafile) == "https on ::1\n"
    status = run_pod(pod_dir, "status")
    assert "LOCAL_PORTS=%s" % ",".join(targets) in status.stdout.splitlines()


def closed_at_once(port):
    """What a consumer gets before the connection ends (a reset counts as an end)."""
    try:
        return echo_round_trip(port)
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, AssertionError):
            raise
        return b""


class HeldResolver:
    """A DNS server on 127.0.0.77:53 that answers `name` A 127.0.0.1 (and an
    empty AAAA) only once release() is called; `asked` is set by the first
    query."""

    ADDRESS = ("127.0.0.77", 53)

    def __init__(self, name):
        self.name, self.asked, self.released = name, threading.Event(), threading.Event()
        self.askers = set()   # (address, port) of each asking socket: one per lookup
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(self.ADDRESS)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        for _ in range(100):
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if peer is None:  # stop() shut the socket down
                return
            self.askers.add(peer)
            self.asked.set()
            threading.Thread(target=self.answer, args=(query, peer), daemon=True).start()

    def answer(self, query, peer):
        if not self.released.wait(30):
            return
        end = query.index(b"\0", 12) + 5
        qtype = struct.unpack("!H", query[end - 4:end - 2])[0]
        found = qtype == 1 and query[12:end - 5].lower() == b"".join(
            bytes([len(label)]) + label.encode() for label in self.name.split("."))
        head = query[:2] + struct.pack("!5H", 0x8180, 1, int(found), 0, 0)
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([127, 0, 0, 1])
        try:
            self.sock.sendto(head + query[12:end] + (record if found else b""), peer)
        except OSError:
            pass

    def release(self):
        self.released.set()

    def stop(self):
        self.released.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recvfrom (Linux), then ENOTCONN
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.mark.skipif(os.geteuid() != 0, reason="binds port 53 and a private /etc/resolv.conf")
def test_services_slow_name_lookup_stalls_no_other_stream(server, workdir, services, procs):
    """A NAME:PORT target whose resolver is slow: while its lookup waits, the
    pod's other service is served, and the bytes the consumer sent meanwhile
    reach the service once the name resolves. The pod runs in a mount
    namespace of its own whose /etc/resolv.conf names the held resolver."""
    resolver = HeldResolver("slow.pipe2me.test")
    try:
        resolv = os.path.join(workdir, "resolv.conf")
        with open(resolv, "w") as fh:
            fh.write("nameserver %s\noptions timeout:30 attempts:1\n" % resolver.ADDRESS[0])
        quick, slow = services(echo_handler), services(echo_handler)
        pod_dir = os.path.join(workdir, "pod")
        setup_pod(server, pod_dir, "tcp,tcp", [quick.port, "slow.pipe2me.test:%d" % slow.port])
        pod = Proc(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                    resolv, sys.executable, POD, "--dir", pod_dir, "start"], workdir, "pod")
        procs.append(pod)
        pod.wait_for(r"tunnel up")
        quick_port, slow_port = public_ports(pod_dir)
        with connect(slow_port) as waiting:
            waiting.sendall(b"sent while the name resolves\n")
            waiting.shutdown(socket.SHUT_WR)
            assert resolver.asked.wait(10), "the pod never asked the resolver"
            assert echo_round_trip(quick_port, timeout=5) == b"ping through pipe2me\n"
            # consumers that abort at once: their lookups still hold the 16 lookup threads
            for _ in range(15):
                aborted = connect(slow_port)
                aborted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                aborted.close()
            wait_until(lambda: len(resolver.askers) >= 16, timeout=10, what="16 lookups running")
            with connect(slow_port) as refused:
                pod.wait_for(r"target=slow\.pipe2me\.test:%d error=16 name lookups already "
                             r"running" % slow.port, timeout=10)
                assert recv_to_eof(refused, 10) == b""
            resolver.release()
            assert recv_to_eof(waiting, 10) == b"sent while the name resolves\n"
    finally:
        resolver.stop()


def test_services_failed_target_is_logged(server, workdir, procs):
    pod_dir = os.path.join(workdir, "pod")
    dead = free_port()
    setup_pod(server, pod_dir, "tcp,tcp", ["[::1]:%d" % dead, "no-such-host.invalid:%d" % dead])
    pod = start_pod(workdir, pod_dir)
    procs.append(pod)
    first, second = public_ports(pod_dir)
    assert closed_at_once(first) == b""
    pod.wait_for(r"local service unavailable stream=\d+ target=\[::1\]:%d error=" % dead)
    assert closed_at_once(second) == b""
    pod.wait_for(r"local service unavailable stream=\d+ target=no-such-host\.invalid:%d "
                 r"error=cannot resolve" % dead)


# `python3 -m http.server` looks its address up (socket.getfqdn) before it
# listens: 10 s of resolver timeouts in a namespace without DNS.
HTTP_SERVER_SCRIPT = """
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"""


def test_services_lan_host_behind_the_pod(tmp_path):
    """The pod in "lan", its services on another host of its LAN (the router's
    LAN side), consumers in "wan": per-port URL, HTTP front, SNI front."""
    import nat_testbed
    from test_nat import Home, POD_PYTHON, NsProc
    with nat_testbed.NatTestbed(upnp=False) as nat:
        home = Home(nat, str(tmp_path))
        try:
            lan_host = nat.router_lan_ip
            tcp_port, http_port, tls_port = 21000, 21001, 21002
            fqdn = home.pod_cmd("setup", "--server", home.url, "--auth", home.token,
                                "--protocols", "tcp,http,https", "--local-ports",
                                "%s:%d,%s:%d,%s:%d" % (lan_host, tcp_port, lan_host, http_port,
                                                      lan_host, tls_port)).stdout.strip()
            nat.start_banner_server("router", "lan-tcp", port=tcp_port, max_s=120)
            nat.start_banner_server("router", "lan-tls", port=tls_port, max_s=120,
                                    tls=pod_cert(home.pod_dir))
            nat.run_in("router", [sys.executable, "-c", HTTP_SERVER_SCRIPT, lan_host,
                                  str(http_port), str(tmp_path)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(os.path.join(str(tmp_path), "hello.txt"), "w") as fh:
                fh.write("lan-http\n")
            home.pod = NsProc(nat, "lan", [POD_PYTHON, POD, "--dir", home.pod_dir, "start"],
                              home.workdir, "pod")
            home.pod.wait_for(r"tunnel up")
            ports = [int(u.rsplit(":", 1)[1]) for u in re.findall(
                r"PIPE2ME_URLS_\d='([^']+)'", home.pod_cmd("env").stdout)]
            ok, data = nat.probe_tcp("wan", nat.wan_ip, ports[0])
            assert ok and data.startswith("lan-tcp "), data
            fetch = lambda *a: nat.call_in("wan", ["curl", "-sS", "--max-time", "10"] + list(a))
            wait_until(lambda: fetch("http://%s:%d/hello.txt" % (nat.wan_ip, ports[1])).stdout
                       == "lan-http\n", 15, what="the LAN http service")
            assert fetch("-H", "Host: " + fqdn, "http://%s:8080/hello.txt" % nat.wan_ip
                         ).stdout == "lan-http\n"
            for port in (ports[2], 8443):  # per-port URL and the SNI front
                probe = nat.call_in("wan", ["openssl", "s_client", "-connect",
                                            "%s:%d" % (nat.wan_ip, port), "-servername", fqdn,
                                            "-CAfile", os.path.join(home.pod_dir, "pipe2me.cacert"),
                                            "-verify_return_error", "-quiet"], input="")
                assert "lan-tls" in probe.stdout, probe.stderr
        finally:
            if home.pod is not None:
                home.pod.stop()
            assert home.server.stop() == 0


# ---- PROXY protocol --------------------------------------------------------

NGINX_CONF = """\
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format pp '$proxy_protocol_addr $proxy_protocol_port';
    server {{
        listen {host}:{port} proxy_protocol;
        access_log {dir}/plain.log pp;
        location / {{ return 200 "nginx $proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
    server {{
        listen {host}:{tls_port} ssl proxy_protocol;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {dir}/tls.log pp;
        location / {{ return 200 "nginx-tls $proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    log stderr format short local0
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend pp
    bind {host}:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "haproxy %[src] %[src_port]\\n"
"""


def start_nginx(workdir, host, port, tls_port, cert, key):
    conf_dir = os.path.join(workdir, "nginx")
    os.makedirs(conf_dir, exist_ok=True)
    conf = os.path.join(conf_dir, "nginx.conf")
    with open(conf, "w") as fh:
        fh.write(NGINX_CONF.format(dir=conf_dir, host=host, port=port, tls_port=tls_port,
                                   cert=cert, key=key))
    proc = Proc([shutil.which("nginx") or "/usr/sbin/nginx", "-p", conf_dir, "-c", conf],
                workdir, "nginx")
    wait_until(lambda: os.path.exists(os.path.join(conf_dir, "nginx.pid")) or not proc.alive(),
               15, what="nginx")
    assert proc.alive(), open(os.path.join(conf_dir, "nginx.error.log")).read()
    return proc, conf_dir


def start_haproxy(workdir, host, port):
    conf = os.path.join(workdir, "haproxy.cfg")
    with open(conf, "w") as fh:
        fh.write(HAPROXY_CONF.format(host=host, port=port))
    proc = Proc([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", conf],
                workdir, "haproxy")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def listening():
        assert proc.alive(), proc.stderr()
        with socket.socket(family) as probe:
            return probe.connect_ex((host.strip("[]"), port)) == 0
    wait_until(listening, 15, what="haproxy")
    return proc


class V6Server(ServerHandle):
    """A ServerHandle whose listeners are on ::1."""

    def start(self, fixed_ports=False):
        argv = self.argv()
        argv[argv.index("--listen-address") + 1] = "::1"
        self.proc = Proc(argv, self.workdir, self.name, env=self.env)
        ready = self.proc.wait_for(r"ready http=\S+:(\d+) https=\S+:(\d+) tunnel=\S+:(\d+)")
        self.http, self.https, self.tunnel = (int(p) for p in ready.groups())
        self.token = re.search(r"^token: (\S+)", self.proc.stdout(), re.M).group(1)
        return self

    @property
    def url(self):
        return "http://[::1]:%d" % self.http


def curl_from(url, *extra):
    """(body, 'consumer_ip consumer_port') of one request, curl's own end."""
    out = curl_ok("-w", "%{local_ip} %{local_port}", *extra, url).decode()
    body, _, local = out.rpartition("\n")
    return body, local


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_services_proxy_protocol_nginx_haproxy(workdir, family, procs):
    """tcp (nginx), tcp (haproxy) and https (nginx ssl) services behind PROXY
    protocol v1, then v2 after `update`: each reader sees curl's own address."""
    host = "127.0.0.1" if family == "ipv4" else "::1"
    url_host = host if family == "ipv4" else "[::1]"
    server = ServerHandle(workdir) if family == "ipv4" else V6Server(workdir)
    try:
        pod_dir = os.path.join(workdir, "pod")
        local = [free_port() for _ in range(3)]
        setup = run_pod(pod_dir, "setup", "--server", server.url,
                        "--auth", server.token, "--protocols", "tcp,tcp,https",
                        "--local-ports", ",".join("127.0.0.1:%d" % p for p in local),
                        "--proxy-protocol", "v1", check=True)
        fqdn = setup.stdout.strip()
        assert pod_env(pod_dir)["PIPE2ME_PROXY_PROTOCOL"] == "v1"
        cert, key = pod_cert(pod_dir)
        nginx, nginx_dir = start_nginx(workdir, "127.0.0.1", local[0], local[2], cert, key)
        procs.append(nginx)
        procs.append(start_haproxy(workdir, "127.0.0.1", local[1]))
        pod = start_pod(workdir, pod_dir)
        procs.append(pod)
        ports = public_ports(pod_dir)
        cafile = os.path.join(pod_dir, "pipe2me.cacert")

        def check_all():
            body, me = curl_from("http://%s:%d/" % (url_host, ports[0]))
            assert body == "nginx " + me, body
            assert open(os.path.join(nginx_dir, "plain.log")).read().splitlines()[-1] == me
            body, me = curl_from("http://%s:%d/" % (url_host, ports[1]))
            assert body == "haproxy " + me
            for port in (ports[2], server.https):  # per-port URL and the SNI front
                body, me = curl_from("https://%s:%d/" % (fqdn, port), "--cacert", cafile,
                                     "--resolve", "%s:%d:%s" % (fqdn, port, host))
                assert body == "nginx-tls " + me
        check_all()
        after = len(pod.stderr())
        done = run_pod(pod_dir, "update", "--proxy-protocol", "v2", check=True)
        assert "proxy protocol set" in done.stderr
        assert pod_env(pod_dir)["PIPE2ME_PROXY_PROTOCOL"] == "v2"
        pod.wait_for(r"tunnel up", after=after)
        check_all()
    finally:
        for proc in procs:
            proc.stop()
        assert server.stop() == 0


def test_services_proxy_protocol_refused_values(server, workdir):
    pod_dir = os.path.join(workdir, "pod")
    done = run_pod(pod_dir, "setup", "--server", server.url, "--auth", server.token,
                   "--protocols", "tcp", "--proxy-protocol", "v3")
    assert done.returncode == 2 and "choose v1, v2 or off" in done.stderr
    assert not os.path.exists(os.path.join(pod_dir, "pipe2me.info.inc"))
    import json
    import urllib.request
    request = urllib.request.Request(server.url + "/tunnels", method="POST", data=json.dumps(
        {"token": server.token, "protocols": ["tcp"], "proxy_protocol": "v9"}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400


# ---- compatibility with the original code -------------------------------------

def base_script(name):
    path = os.path.join(BASE, name)
    if not os.path.exists(path):
        pytest.skip("the original code is not at %s" % BASE)
    return path


def test_services_original_pod_with_this_server(server, workdir, services, procs):
    """A pod of today (no "features" in HELLO) gets 2-byte OPENs and works,
    also on a tunnel with PROXY protocol on (it writes no header)."""
    from conftest import echo_handler
    old_pod = base_script("pipe2me_pod.py")
    pod_dir = os.path.join(workdir, "oldpod")
    service = services(echo_handler)
    os.makedirs(pod_dir)
    done = subprocess.run([sys.executable, old_pod, "--dir", pod_dir, "setup", "--server",
                           server.url, "--auth", server.token, "--protocols", "tcp",
                           "--local-ports", str(service.port)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    proc = Proc([sys.executable, old_pod, "--dir", pod_dir, "start"], workdir, "oldpod")
    procs.append(proc)
    proc.wait_for("tunnel up")
    (port,) = public_ports(pod_dir)
    assert echo_round_trip(port, b"old pod\n") == b"old pod\n"
    assert "protocol error" not in proc.stderr()


def test_services_this_pod_with_original_server(workdir, services, procs):
    from conftest import echo_handler
    old_server = base_script("pipe2me_server.py")
    handle = ServerHandle.__new__(ServerHandle)
    handle.workdir, handle.state_dir = workdir, os.path.join(workdir, "oldstate")
    handle.tunnel_ports, handle.extra, handle.name = free_port_range(4), [], "oldserver"
    handle.env = clean_env(os.path.join(workdir, "home"))
    original_argv = ServerHandle.argv

    def argv():
        args = original_argv(handle)
        args[1] = old_server
        return args
    handle.argv = argv
    handle.start()
    try:
        service = services(echo_handler)
        pod_dir = os.path.join(workdir, "pod")
        done = run_pod(pod_dir, "setup", "--server", handle.url, "--auth", handle.token,
                       "--protocols", "tcp", "--local-ports", "localhost:%d" % service.port,
                       "--proxy-protocol", "v2", check=True)
        assert "did not keep --proxy-protocol v2" in done.stderr
        pod = start_pod(workdir, pod_dir)
        procs.append(pod)
        (port,) = public_ports(pod_dir)
        assert echo_round_trip(port, b"new pod\n") == b"new pod\n"
    finally:
        for proc in procs:
            proc.stop()
        assert handle.stop() == 0
