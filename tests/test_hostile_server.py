"""A hostile or broken server against a real `start`: a tunnel port written
here (TLS with the real server's certificate) answers the pod's HELLO with
what each test chooses. The pod must log, drop the session and dial again;
no answer of the server may end the process."""
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time

import pytest

from helpers import RawHttp, api, raises_within
from conftest import POD, Proc, free_port, run_pod, setup_pod, wait_until


class FakeTunnelPort:
    """Accepts the pod's connections on 127.0.0.1; each is greeted by
    `script(mod, tls)`, which then holds it until the pod closes it."""

    def __init__(self, mod, state_dir, script):
        self.mod, self.script = mod, script
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca = os.path.join(state_dir, "ca")
        self.context.load_cert_chain(os.path.join(ca, "server.pem"), os.path.join(ca, "server.key"))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greeted = 0
        self.closing = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        """Serve each connection in its own thread until close()."""
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        """TLS, the pod's HELLO, then the script; hold until the pod closes."""
        mod = self.mod
        try:
            conn.settimeout(10)
            tls = self.context.wrap_socket(conn, server_side=True)
            mod.read_frame_blocking(tls, mod.POD_SENDS, mod.time.monotonic() + 10)
            self.greeted += 1
            self.script(mod, tls)
            tls.settimeout(30)
            while tls.recv(65536):
                pass
        except (OSError, mod.ProtocolError):
            pass
        finally:
            conn.close()

    def close(self):
        """Stop accepting."""
        self.closing = True
        self.listener.close()


def welcome(mod, tls, **fields):
    """Send WELCOME with `fields`."""
    tls.sendall(mod.encode_control(mod.Msg.WELCOME, dict({"fqdn": "x"}, **fields)))


@pytest.fixture
def hostile(server, workdir, pod_mod):
    """start(script): a pod of `server` dialing a FakeTunnelPort with `script`
    instead; yields (fake port, pod process)."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [free_port()])
    made = []

    def start(script, *extra):
        fake = FakeTunnelPort(pod_mod, server.state_dir, script)
        env = dict(os.environ, PIPE2ME_TUNNEL="127.0.0.1:%d" % fake.port)
        pod = Proc([sys.executable, POD, "--dir", pod_dir, "start", "--reconnect-delay", "0.05"]
                   + list(extra), workdir, "pod", env=env)
        made.append((fake, pod))
        return fake, pod
    yield start
    for fake, pod in made:
        pod.stop(signal.SIGKILL)
        fake.close()


def cpu_seconds(pid):
    """User plus system CPU time of process `pid` so far."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("beat", ["soon", [5], float("nan"), -1, 0.001])
def test_hostile_server_welcome_with_a_heartbeat_of_no_use(hostile, beat):
    """WELCOME's heartbeat_interval_s not a number of seconds the server may send
    (1 or more): the default instead, not a ValueError out of `start`, a NaN timer
    that never comes due while the loop polls at once, or a session that ends at
    once and is dialed again at once."""
    fake, pod = hostile(lambda mod, tls: welcome(mod, tls, heartbeat_interval_s=beat))
    pod.wait_for(r"tunnel up|Traceback", timeout=20)
    before, started = cpu_seconds(pod.pid), time.monotonic()
    time.sleep(2.0)  # a measuring window, not a wait for a condition
    used = (cpu_seconds(pod.pid) - before) / (time.monotonic() - started)
    print("\npod CPU after heartbeat_interval_s=%r: %.0f%%, %d dials" % (beat, 100 * used,
                                                                     fake.greeted))
    assert pod.alive() and "Traceback" not in pod.stderr(), pod.stderr()[-3000:]
    assert used < 0.3 and fake.greeted == 1, pod.stderr()[-3000:]


def cert_frames(*frames):
    """A script: WELCOME, then a CERT frame with each of `frames`."""
    def script(mod, tls):
        welcome(mod, tls)
        for acme in frames:
            tls.sendall(mod.encode_control(mod.Msg.CERT, acme))
    return script


def test_hostile_server_cert_chain_no_file_can_hold(hostile):
    """A chain that is not UTF-8 text (a lone surrogate, as JSON may carry):
    refused, the session goes on to the next CERT frame (it was ended and
    dialed again at once, forever)."""
    fake, pod = hostile(cert_frames({"state": "valid", "chain": "-----BEGIN CERTIFICATE-----\ud800"},
                                    {"state": "pending", "reason": "next frame"}))
    pod.wait_for(r"acme certificate not issued state=pending reason=next frame"
                 r"|internal error contained|Traceback", timeout=20)
    assert fake.greeted == 1 and "internal error" not in pod.stderr(), pod.stderr()[-3000:]


@pytest.mark.parametrize("when", ["soon", 1e20, float("nan"), [1]])
def test_hostile_server_cert_times_that_are_no_time(hostile, workdir, when):
    """not_after and next_try_at that are no epoch second: `status` still
    answers (time.gmtime() took them from the status file)."""
    fake, pod = hostile(cert_frames({"state": "pending", "reason": "odd times", "not_after": when,
                                     "next_try_at": when}))
    pod.wait_for(r"acme certificate not issued state=pending reason=odd times", timeout=20)
    status = os.path.join(workdir, "pod", "pipe2me.status.json")
    wait_until(lambda: "odd times" in open(status).read(), timeout=10, what="the status file")
    done = run_pod(os.path.join(workdir, "pod"), "status")
    assert "Traceback" not in done.stderr and "ACME=pending" in done.stdout, done.stderr


class FakeApi:
    """An HTTP API on 127.0.0.1 answering every request with `answer(method, path)`:
    (status, JSON object)."""

    def __init__(self, answer):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            """One request: the answer the test chose."""

            def answer_it(self):
                """Read the body, send the chosen answer."""
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, obj = answer(self.command, self.path)
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_GET = do_POST = do_PATCH = do_DELETE = answer_it

            def log_message(self, *_):
                """Quiet."""
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_pod(server, workdir, pod_mod):
    """serve(answer): a pod of `server` whose settings now name a FakeApi;
    yields (pod dir, the tunnel object the real server has)."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [free_port()])
    info = pod_mod.parse_inc(open(os.path.join(pod_dir, pod_mod.INFO_FILE)).read(), "info")
    tunnel = api(server, "GET", "/tunnels/" + info["PIPE2ME_ID"], secret=info["PIPE2ME_SECRET"]).json()
    fakes = []

    def serve(answer):
        fake = FakeApi(answer)
        fakes.append(fake)
        local = os.path.join(pod_dir, pod_mod.LOCAL_FILE)
        values = pod_mod.parse_inc(open(local).read(), "local")
        values["PIPE2ME_SERVER"] = fake.url
        with open(local, "w") as handle:
            handle.write(pod_mod.format_inc(values))
        return fake
    yield pod_dir, tunnel, serve
    for fake in fakes:
        fake.close()


@pytest.mark.parametrize("field, value", [("urls", ["tcp://x:1\nPIPE2ME_ID='a"]),
                                          ("tunnel_domain", "pipe2.localhost\n"),
                                          ("proxy_protocol", "v1\r")])
def test_hostile_server_update_with_a_line_break_in_a_setting(api_pod, field, value):
    """A tunnel object whose URL, tunnel domain or proxy protocol holds a line
    break: `update` refuses it and the settings file stays readable (it was
    written, and every command after, `clear` too, ended on a quote the
    file's next line did not close)."""
    pod_dir, tunnel, serve = api_pod
    serve(lambda method, path: (200, dict(tunnel, **{field: value})))
    done = run_pod(pod_dir, "update")
    print("\nupdate: %d %s" % (done.returncode, done.stderr.strip()[-300:]))
    after = run_pod(pod_dir, "env")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize("url", ["tcp://x.example:99999", "tcp://x.example:http", "tcp://x.example"])
def test_hostile_server_update_with_a_url_without_a_port(api_pod, url):
    """A URL with no port, or one out of range: `update` refuses it (it was
    written, and every `start` after ended in a ValueError traceback)."""
    pod_dir, tunnel, serve = api_pod
    serve(lambda method, path: (200, dict(tunnel, urls=[url])))
    done = run_pod(pod_dir, "update")
    assert done.returncode == 4 and "bad tunnel object" in done.stderr, done.stderr



@pytest.mark.parametrize("when", ["soon", 1e20, [1]])
def test_hostile_server_check_answer_with_a_time_that_is_no_time(api_pod, when):
    """`check`'s checked_at that is no epoch second: TIME is left empty, not a
    traceback; the address is printed with its controls escaped."""
    pod_dir, _tunnel, serve = api_pod
    serve(lambda method, path: (200, {"status": "direct", "address": "192.0.2.1\x1b[2J",
                                      "checked_at": when}))
    done = run_pod(pod_dir, "check")
    assert "Traceback" not in done.stderr and "REACH=direct" in done.stdout, done.stderr
    assert "ADDRESS=192.0.2.1\\x1b[2J\n" in done.stdout, done.stdout


def test_hostile_server_error_text_reaches_the_terminal_escaped(api_pod):
    """The server's `error` for a refused call is shown with its controls escaped:
    no terminal sequence of the server's reaches the user's terminal."""
    pod_dir, _tunnel, serve = api_pod
    serve(lambda method, path: (403, {"error": "refused\x1b]0;owned\x07\x1b[2J"}))
    done = run_pod(pod_dir, "update")
    print("\nupdate: %d %r" % (done.returncode, done.stderr))
    assert done.returncode == 4 and "refused" in done.stderr, done.stderr
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr, done.stderr


def test_hostile_server_that_ends_each_session_at_once_is_dialed_with_backoff(hostile):
    """WELCOME, then the connection closed: each such session counts as a failed
    connect, so the pod backs off (it dialed again at once, ~300 handshakes a
    second at 80% CPU, for as long as the server did so)."""
    def script(mod, tls):
        welcome(mod, tls)
        raise OSError("closed after WELCOME")
    fake, pod = hostile(script)
    pod.wait_for(r"tunnel up", timeout=20)
    time.sleep(2.0)  # a window to count dials in, not a wait for a condition
    print("\ndials in 2 s: %d" % fake.greeted)
    assert fake.greeted <= 12 and pod.alive(), pod.stderr()[-3000:]
    assert "tunnel connect failed attempt=3 " in pod.stderr(), pod.stderr()[-3000:]


def test_hostile_server_cert_flood_runs_the_hook_once_more_not_once_each(hostile, workdir):
    """40 CERT frames whose chains alternate (the same certificate, with and
    without a last newline): the --on-cert-change hook runs one at a time, and
    once more after it for the changes that came meanwhile (it ran once per
    frame, 39 shells at once for as long as the server went on)."""
    pod_dir, ran = os.path.join(workdir, "pod"), os.path.join(workdir, "hook-runs")
    chain = open(os.path.join(pod_dir, "pipe2me.openssl.cert")).read()
    fake, pod = hostile(cert_frames(*({"state": "valid", "chain": chain + "\n" * (i % 2)}
                                      for i in range(40))),
                        "--on-cert-change", "echo $$ >> %s; sleep 0.5" % ran)
    runs = lambda: len(open(ran).read().split()) if os.path.exists(ran) else 0
    wait_until(lambda: pod.stderr().count("on-cert-change hook ran") >= 2 or runs() > 2,
               timeout=20, what="two hook runs")
    time.sleep(1.0)  # a window for more runs, not a wait for a condition
    print("\nhook runs for 40 CERT frames: %d" % runs())
    assert runs() == 2 and fake.greeted == 1, pod.stderr()[-3000:]


def test_hostile_server_update_signs_with_a_certificate_no_file_can_hold(api_pod):
    """A certificate answer that is not ASCII (a lone surrogate): `update` ends
    with one line, not a UnicodeEncodeError traceback."""
    pod_dir, tunnel, serve = api_pod
    renewed = dict(tunnel, expires_at=tunnel["expires_at"] + 86400)  # a change: `update` signs
    serve(lambda method, path: (200, {"cert": "-----BEGIN CERTIFICATE-----\ud800"}
                                if path.endswith("/cert") else renewed))
    done = run_pod(pod_dir, "update")
    print("\nupdate: %d %r" % (done.returncode, done.stderr[-300:]))
    assert done.returncode == 4 and "Traceback" not in done.stderr, done.stderr


def test_hostile_server_cert_state_text_reaches_status_escaped(hostile, workdir):
    """The ACME state and reason of a CERT frame, with a terminal sequence and
    a lone surrogate: `status` prints them escaped (stdout refused the
    surrogate with a UnicodeEncodeError traceback; ESC reached the terminal)."""
    fake, pod = hostile(cert_frames({"state": "odd\x1b[2J", "reason": "why\ud800\x1b]0;x\x07"}))
    pod.wait_for(r"acme certificate not issued state=odd", timeout=20)
    status = os.path.join(workdir, "pod", "pipe2me.status.json")
    wait_until(lambda: "why" in open(status).read(), timeout=10, what="the status file")
    done = run_pod(os.path.join(workdir, "pod"), "status")
    print("\nstatus: %r %r" % (done.stdout, done.stderr[-300:]))
    assert "Traceback" not in done.stderr and "ACME_REASON=" in done.stdout, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout, done.stdout


@pytest.mark.parametrize("frame", [
    lambda mod: mod.encode_control(mod.Msg.WELCOME, {}),             # a second WELCOME
    lambda mod: mod.encode_frame(mod.Msg.CERT, 0, b"\xff not JSON"),  # a control frame no JSON
    lambda mod: mod.encode_control(mod.Msg.CERT, {"chain": ["-----BEGIN CERTIFICATE-----"],
                                                 "not_after": "x", "state": {"a": 1}}),
])
def test_hostile_server_odd_control_frames_end_only_the_session(hostile, frame):
    """A control frame the pod cannot use after WELCOME: a protocol error (or
    nothing) for that session alone, logged in one line, no traceback and no
    contained internal error; the pod dials again."""
    def script(mod, tls):
        welcome(mod, tls)
        tls.sendall(frame(mod))
        tls.sendall(mod.encode_control(mod.Msg.GOAWAY, {"reason": "done"}))
    fake, pod = hostile(script)
    wait_until(lambda: fake.greeted >= 2 or not pod.alive(), timeout=20, what="a second dial")
    assert pod.alive() and "Traceback" not in pod.stderr(), pod.stderr()[-3000:]
    assert "internal error" not in pod.stderr(), pod.stderr()[-3000:]


@pytest.mark.parametrize("ports", [[0], ["0,1"], [70000], [True]])
def test_hostile_server_setup_with_ports_that_are_no_ports(server, workdir, ports):
    """A tunnel object whose ports are no TCP port numbers (without --local-ports
    they become the local ports): `setup` refuses it and leaves no setup (it
    exited 0, and every command after, `clear` too, refused the settings file)."""
    tunnel = {"id": "abc123", "fqdn": "a-b-c.pipe2.localhost", "ports": ports,
              "urls": ["tcp://a-b-c.pipe2.localhost:20001"], "protocols": ["tcp"],
              "tunnel_port": 1, "expires_at": 2000000000, "secret": "s3"}
    pem = open(os.path.join(server.state_dir, "ca", "ca.pem")).read()
    answers = {"/config": {"protocol_version": 1, "protocols": ["tcp"]}, "/tunnels": tunnel,
               "/tunnels/abc123/cert": {"cert": pem}, "/cacert": {"pem": pem}}
    fake = FakeApi(lambda method, path: (200, answers.get(path, {})))
    pod_dir = os.path.join(workdir, "pod")
    try:
        done = run_pod(pod_dir, "setup", "--server", fake.url, "--auth", "t", "--protocols", "tcp")
    finally:
        fake.close()
    assert done.returncode == 4 and "bad tunnel object" in done.stderr, done.stderr
    assert not os.path.exists(os.path.join(pod_dir, "pipe2me.local.inc"))


@pytest.mark.parametrize("status", [200, 500])
def test_hostile_server_api_answer_trickled_is_cut_at_the_timeout(pod_mod, status):
    """A server that sends its answer's body a byte every 0.2 s: the API client gives up
    at its timeout, in all, with the one-line error of a timeout (urllib's
    timeout bounds each read: get_config took 10 s and more against 1 s)."""
    body = b'{"version": "1", "tunnel_domain": "pipe2.localhost", "padding": "%s"}' % (b"x" * 60)
    raw = RawHttp(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d"
                  b"\r\n\r\n%s" % (status, len(body), body), gap_s=0.2)
    client = pod_mod.ApiClient(raw.url)
    client.timeout_s = 1
    try:
        error = raises_within(client.get_config, pod_mod.Unavailable, 15)
    finally:
        raw.close()
    assert error == "server unreachable: %s: timed out after 1 s" % raw.url, error
