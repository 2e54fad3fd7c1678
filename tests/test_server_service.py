"""The server as a service (issue 12 point 8): `pipe2me_server.py service
--systemd|--sysv` prints a definition that runs the server with its
configuration, restarts it after a failure and grants only
CAP_NET_BIND_SERVICE to a non-root user. The systemd unit is checked by
`systemd-analyze verify` and `systemd-analyze security`; the System V script
is run for real: it starts the server as `nobody`, which binds a port below
1024 on 127.0.0.1 with that one capability, and stops it by its PID file.
The example deployment in examples/ is checked the same way."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, SERVER, free_port, free_port_range, wait_until

sys.path.insert(0, os.path.join(ROOT, "bench"))
from peers import port_free  # noqa: E402  (one bind check for tests and benchmarks)

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by `nobody`, unlike a python under /root


def server_cmd(*args, python=sys.executable, env=None):
    return subprocess.run([python, SERVER] + list(args), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env)


def write_config(path, **values):
    with open(path, "w") as fh:
        fh.write("".join("%s=%s\n" % item for item in values.items()))
    os.chmod(path, 0o644)


def verify_unit(text, directory):
    path = os.path.join(directory, "pipe2me-server.service")
    with open(path, "w") as fh:
        fh.write(text)
    done = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true",
                               "--threshold=25", path], capture_output=True, text=True,
                              timeout=60)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    return path


@pytest.fixture
def shared_tmp():
    """A temporary directory `nobody` can enter (pytest's are mode 0700)."""
    path = tempfile.mkdtemp(prefix="pipe2me-service-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_server_service_systemd_unit(shared_tmp):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    config = os.path.join(shared_tmp, "pipe2me.server.conf")
    state = os.path.join(shared_tmp, "state")
    write_config(config, TUNNEL_DOMAIN="tunnels.example.net", STATE_DIR=state)
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    done = server_cmd("--config", config, "service", "--systemd", python=python)
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    lines = set(unit.splitlines())
    assert "ExecStart=%s %s --config %s" % (python, SERVER, config) in lines, unit
    for wanted in ("User=pipe2me", "Restart=on-failure", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                   "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ReadWritePaths=%s" % state,
                   "ProtectHome=%s" % ("read-only" if python.startswith("/root/") else "yes"),
                   "ExecReload=/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=2"):
        assert wanted in lines, (wanted, unit)
    verify_unit(unit, shared_tmp)
    other = server_cmd("--config", config, "service", "--systemd", "--user", "tunnels")
    assert "User=tunnels" in other.stdout.splitlines()
    bad = server_cmd("--config", config, "service", "--systemd", "--user", "root; rm")
    assert bad.returncode == 2 and "bad --user" in bad.stderr


def test_server_service_sysv_runs_as_nobody_with_one_capability(shared_tmp):
    """The init script starts the server as nobody; it binds a low port."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and %s" % SYSTEM_PYTHON)
    low = next((p for p in range(1023, 900, -1) if port_free(p)), None)
    assert low, "no free port below 1024 on 127.0.0.1"
    state = os.path.join(shared_tmp, "state")
    os.makedirs(state)
    shutil.chown(state, "nobody")
    config = os.path.join(shared_tmp, "pipe2me.server.conf")
    write_config(config, STATE_DIR=state, LISTEN_ADDRESS="127.0.0.1", HTTP_PORT=low,
                 HTTPS_PORT=free_port(), TUNNEL_PORT=free_port(),
                 TUNNEL_PORTS="%d...%d" % (lambda r: (r[0], r[-1] + 1))(free_port_range(2)))
    done = server_cmd("--config", config, "service", "--sysv", "--user", "nobody",
                      python=SYSTEM_PYTHON)
    assert done.returncode == 0, done.stderr
    script = os.path.join(shared_tmp, "pipe2me-server")
    with open(script, "w") as fh:
        fh.write(done.stdout)
    env = dict(os.environ, PIDFILE=os.path.join(shared_tmp, "server.pid"),
               LOGFILE=os.path.join(shared_tmp, "server.log"))
    started = subprocess.run(["sh", script, "start"], env=env, capture_output=True, text=True,
                             timeout=30)
    assert started.returncode == 0, started.stderr
    supervisor = int(open(env["PIDFILE"]).read())
    try:
        log = lambda: open(env["LOGFILE"]).read()
        wait_until(lambda: "ready http=127.0.0.1:%d" % low in log(), 30, what="the server")
        server_pid = child_of(supervisor)
        status = open("/proc/%d/status" % server_pid).read()
        assert re.search(r"^Uid:\s+65534\s", status, re.M), status
        assert re.search(r"^CapEff:\s+0*400$", status, re.M), status  # CAP_NET_BIND_SERVICE only
        assert re.search(r"^CapBnd:\s+0*400$", status, re.M), status
        with socket.create_connection(("127.0.0.1", low), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
        assert subprocess.run(["sh", script, "status"], env=env, timeout=30).returncode == 0
        stopped = subprocess.run(["sh", script, "stop"], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.exists("/proc/%d" % server_pid)
        assert "Traceback" not in log(), log()
    finally:
        for pid in (supervisor,):
            if os.path.exists("/proc/%d" % pid):
                os.kill(pid, 15)


def child_of(pid):
    """The one child process of `pid` (the server under the supervising shell)."""
    def child():
        text = open("/proc/%d/task/%d/children" % (pid, pid)).read().split()
        return int(text[0]) if text else None
    return wait_until(child, 10, what="the supervised server")


def test_server_service_example_deployment(shared_tmp):
    """examples/: the configuration is valid and names ports 80, 443, 53 and
    the built-in DNS; the unit beside it passes systemd-analyze."""
    example = os.path.join(ROOT, "examples", "server")
    config = os.path.join(example, "pipe2me.server.conf")
    env = dict(os.environ, HOME=shared_tmp)
    checked = server_cmd("--config", config, "check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    values = dict(line.split("  #")[0].split("=", 1) for line in checked.stdout.splitlines())
    assert (values["HTTP_PORT"], values["HTTPS_PORT"], values["DNS_PORT"]) == ("80", "443", "53")
    assert values["DYNAMIC_DNS_SERVICE"] == "builtin"
    with open(os.path.join(example, "pipe2me-server.service")) as fh:
        unit = fh.read()
    if shutil.which("systemd-analyze"):
        unit = re.sub(r"^ExecStart=\S+", "ExecStart=%s" % SYSTEM_PYTHON, unit, flags=re.M)
        verify_unit(unit, shared_tmp)
