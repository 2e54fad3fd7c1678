"""A hostile or broken server against a real `start`: a tunnel port written
here (TLS with the real server's certificate) answers the pod's HELLO with
what each test chooses. The pod must log, drop the session and dial again;
no answer of the server may end the process."""
import os
import signal
import socket
import ssl
import sys
import threading
import time

import pytest

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

    def start(script):
        fake = FakeTunnelPort(pod_mod, server.state_dir, script)
        env = dict(os.environ, PIPE2ME_TUNNEL="127.0.0.1:%d" % fake.port)
        pod = Proc([sys.executable, POD, "--dir", pod_dir, "start", "--reconnect-delay", "0.05"],
                   workdir, "pod", env=env)
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
