"""Shared fixtures: the two scripts loaded by path, free ports, a process
runner that waits for a log line with a deadline, a running server and pods.

Every process started here is stopped by its PID at teardown; SIGTERM must
make it exit 0 without a traceback."""

import contextlib
import errno
import importlib.util
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "pipe2me_server.py")
POD = os.path.join(ROOT, "pipe2me_pod.py")


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def server_mod():
    return load_script(SERVER, "pipe2me_server")


@pytest.fixture(scope="session")
def pod_mod():
    return load_script(POD, "pipe2me_pod")


def ephemeral_ports():
    """(first, last) of the kernel's local ports for outgoing connections."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first, last = (int(v) for v in f.read().split())
    return first, last


def ports_outside_ephemeral_range():
    """(low, high) for the ports tests choose: below the kernel's ephemeral
    ports, where no outgoing connection can take one before it is bound."""
    first, last = ephemeral_ports()
    if first - 20000 >= 2000:
        return 20000, first
    return last + 1, 65536


def free_port(attempts=200):
    """A port free right now, outside the ephemeral range: no outgoing
    connection can take it before the test binds it."""
    rng = random.Random()
    low, high = ports_outside_ephemeral_range()
    for _ in range(attempts):
        port = rng.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in %d..%d" % (low, high - 1))


def free_port_range(count, attempts=50):
    """A run of `count` consecutive ports that are free right now, outside
    the ephemeral range."""
    rng = random.Random()
    low, high = ports_outside_ephemeral_range()
    for _ in range(attempts):
        base = rng.randrange(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return range(base, base + count)
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range of %d found" % count)


def wait_until(condition, timeout=10.0, interval=0.02, what="condition"):
    """Poll condition() until it is truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))


class Proc:
    """A child process with stdout/stderr captured to files in `workdir`."""

    def __init__(self, argv, workdir, name, env=None, cwd=None):
        self.argv, self.name = argv, name
        self.out_path = os.path.join(workdir, name + ".out")
        self.err_path = os.path.join(workdir, name + ".err")
        self.popen = subprocess.Popen(
            argv, stdout=open(self.out_path, "wb"), stderr=open(self.err_path, "wb"),
            stdin=subprocess.DEVNULL, env=env, cwd=cwd or ROOT)
        self.pid = self.popen.pid

    def stdout(self):
        with open(self.out_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stderr(self):
        with open(self.err_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_for(self, pattern, timeout=15.0, stream="stderr", after=0):
        """Wait for a regex in stderr (or stdout); returns the match."""
        def found():
            if self.popen.poll() is not None and not re.search(pattern, self.read(stream)[after:]):
                raise AssertionError("%s exited %s before %r:\n%s" % (
                    self.name, self.popen.returncode, pattern, self.stderr()[-3000:]))
            return re.search(pattern, self.read(stream)[after:])
        return wait_until(found, timeout, what="%r from %s" % (pattern, self.name))

    def read(self, stream):
        return self.stdout() if stream == "stdout" else self.stderr()

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        """Signal by PID and wait; returns the exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def alive(self):
        return self.popen.poll() is None


MiB = 1024 * 1024
# Configuration keys a test server must not inherit from the machine's environment.
CONFIG_KEY_NAMES = tuple(re.findall(r'^    "([A-Z_]+)": \(', open(SERVER).read(), re.M))


def clean_env(home):
    """os.environ without configuration keys or PIPE2ME_* variables, with HOME=home
    (so no ~/pipe2me.server.conf of this machine is read)."""
    env = {k: v for k, v in os.environ.items()
           if k not in CONFIG_KEY_NAMES and not k.startswith("PIPE2ME_")}
    os.makedirs(home, exist_ok=True)
    env["HOME"] = home
    return env


def connect(port, host="127.0.0.1", timeout=10.0):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_to_eof(sock, timeout=20.0, limit=64 * MiB):
    """Everything the peer sends until it shuts down writing; fails on a deadline."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while len(got) <= limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(MiB)
        except socket.timeout:
            raise AssertionError("no EOF within %.0f s (got %d bytes)" % (timeout, len(got)))
        if not chunk:
            return bytes(got)
        got += chunk
    raise AssertionError("peer sent more than %d bytes" % limit)


def echo_round_trip(port, payload=b"ping through pipe2me\n", timeout=10.0, host="127.0.0.1"):
    """Send payload, half-close, return what comes back before EOF."""
    with connect(port, host, timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_to_eof(sock, timeout)


class LocalService:
    """A TCP service in this process: handler(sock) runs in a thread per
    connection. `ends` records how each connection ended ("eof", "reset").
    host "::1" listens on IPv6 only; tls=(certfile, keyfile) serves TLS."""

    def __init__(self, handler, port=0, backlog=512, host="127.0.0.1", tls=None):
        self.handler = handler
        self.ends = []
        self.context = None
        if tls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*tls)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.acceptor = threading.Thread(target=self.accept_loop, daemon=True)
        self.acceptor.start()

    def accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # stop() shut the listening socket down
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        with conn:
            conn.settimeout(60)
            try:
                if self.context:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self.handler(tls)
                else:
                    self.handler(conn)
                self.ends.append("eof")
            except (ConnectionResetError, BrokenPipeError):
                self.ends.append("reset")
            except OSError as exc:  # ENOTCONN: the peer reset it before our shutdown
                self.ends.append("reset" if exc.errno == errno.ENOTCONN else "error %s" % exc)

    def stop(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self.acceptor.join(5)
        assert not self.acceptor.is_alive()


def read_head(conn):
    """The bytes of one request head from a service's connection, b"" at EOF."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            return b""
        head += data
    return head


def echo_handler(conn):
    while True:
        data = conn.recv(256 * 1024)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class ServerHandle:
    """A running pipe2me server on 127.0.0.1 with free ports, reading no
    configuration of this machine."""

    def __init__(self, workdir, extra=(), env=None, state_dir=None, ports=None, name="server"):
        self.workdir = workdir
        self.state_dir = state_dir or os.path.join(workdir, "state")
        self.tunnel_ports = ports or free_port_range(24)
        self.extra = list(extra)
        self.env = env or clean_env(os.path.join(workdir, "home"))
        self.name = name
        self.start()

    def argv(self):
        return [sys.executable, SERVER, "--state-dir", self.state_dir,
                "--listen-address", "127.0.0.1", "--http-port", "0", "--https-port", "0",
                "--tunnel-port", "0", "--heartbeat-interval", "1",
                "--tunnel-ports", "%d...%d" % (self.tunnel_ports[0], self.tunnel_ports[-1] + 1),
                ] + self.extra

    def start(self, fixed_ports=False):
        argv = self.argv()
        if fixed_ports:  # a restart keeps the ports pods already know
            for flag, port in (("--http-port", self.http), ("--https-port", self.https),
                               ("--tunnel-port", self.tunnel)):
                argv[argv.index(flag) + 1] = str(port)
        self.proc = Proc(argv, self.workdir, self.name, env=self.env)
        try:
            ready = self.proc.wait_for(r"ready http=[\d.]+:(\d+) https=[\d.]+:(\d+) tunnel=[\d.]+:(\d+)")
        except AssertionError:
            self.proc.stop(signal.SIGKILL)
            raise
        self.http, self.https, self.tunnel = (int(p) for p in ready.groups())
        out = re.search(r"^token: (\S+)", self.proc.stdout(), re.M)
        if out:
            self.token = out.group(1)
        return self

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.http

    def restart(self, sig=signal.SIGKILL):
        self.proc.stop(sig)
        return self.start(fixed_ports=True)

    def stop(self):
        code = self.proc.stop()
        assert "Traceback" not in self.proc.stderr(), self.proc.stderr()[-3000:]
        return code

    def mark(self):
        """Where the server's log is now: log text after it is what came since."""
        return len(self.proc.stderr())


def write_tokens(state_dir, lines):
    """A fresh state dir (mode 0700) whose tokens.conf holds `lines`."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(state_dir, "tokens.conf"), "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return state_dir


@pytest.fixture
def services():
    """LocalServices started by a test, stopped after it:
    services(handler, port=0, host=..., tls=...)."""
    started = []

    def start(handler, port=0, **options):
        service = LocalService(handler, port, **options)
        started.append(service)
        return service
    yield start
    for service in started:
        service.stop()


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path)


@pytest.fixture
def server(workdir):
    handle = ServerHandle(workdir)
    yield handle
    assert handle.stop() == 0


def run_pod(pod_dir, *args, timeout=60, env=None, check=False):
    """Run one pod command to completion."""
    argv = [sys.executable, POD, "--dir", pod_dir] + list(args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=env)
    if check and result.returncode != 0:
        raise AssertionError("pod %s failed (%d): %s" % (args[0], result.returncode, result.stderr))
    return result


def setup_pod(server, pod_dir, protocols="tcp", local_ports=None, token=None):
    """`setup` a pod dir against server; returns the FQDN."""
    os.makedirs(pod_dir, exist_ok=True)
    args = ["setup", "--server", server.url, "--auth", token or server.token,
            "--protocols", protocols]
    if local_ports:
        args += ["--local-ports", ",".join(str(p) for p in local_ports)]
    result = run_pod(pod_dir, *args, check=True)
    return result.stdout.strip()


def pod_env(pod_dir):
    """What `eval $(pipe2me_pod.py env)` sets: one `env` run, its output handed to eval
    unquoted ($1), split as the unquoted $(...) splits it."""
    result = run_pod(pod_dir, "env", check=True)
    assert result.stdout
    script = 'set -a\neval $1\nset +a\nenv | grep ^PIPE2ME_ || true'
    out = subprocess.run(["sh", "-c", script, "sh", result.stdout], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def copy_pod_dir(pod_dir, name):
    """A copy of a pod directory (the same tunnel and key, as a copied
    directory on another machine would be): `start` allows one per directory."""
    import shutil
    copy = "%s-%s" % (pod_dir, name)
    shutil.copytree(pod_dir, copy, ignore=shutil.ignore_patterns("pipe2me.lock",
                                                                  "pipe2me.status.json"))
    return copy


def start_pod(workdir, pod_dir, *extra, name="pod", wait=True):
    proc = Proc([sys.executable, POD, "--dir", pod_dir, "start"] + list(extra), workdir, name)
    if wait:
        proc.wait_for(r"tunnel up")
    return proc


def public_ports(pod_dir):
    env = pod_env(pod_dir)
    return [int(env["PIPE2ME_URLS_%d" % i].rsplit(":", 1)[1])
            for i in range(10) if "PIPE2ME_URLS_%d" % i in env]


@contextlib.contextmanager
def http_pods(server, workdir, starters):
    """For each name of {name: starter}: the service starter() returns, an
    http tunnel before it and its pod running (directory workdir/pod-<name>).
    Yields {name: (fqdn, pod_dir, service)}; then stops the pods, the
    services and the server (which must exit 0)."""
    pods, services, tunnels = [], [], {}
    try:
        for name, starter in starters.items():
            service = starter()
            services.append(service)
            pod_dir = os.path.join(workdir, "pod-" + name)
            tunnels[name] = (setup_pod(server, pod_dir, "http", [service.port]), pod_dir, service)
            pods.append(start_pod(workdir, pod_dir, name="pod-" + name))
        yield tunnels
    finally:
        for proc in pods:
            proc.stop()
        for service in services:
            service.stop()
        assert server.stop() == 0
