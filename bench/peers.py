"""The paths the benchmark measures, and the processes behind them.

Sections: PROCESSES (start, wait for a line, stop by PID) → PROC ACCOUNTING
(CPU, RSS/PSS, file descriptors from /proc) → PORTS → SERVICE AND DELAY
RELAY → PATHS (direct, ssh -R, pipe2me).

Glossary: a *path* is one way for a consumer to reach the service: `direct`,
`ssh` (ssh -R, default cipher), `ssh-aes` (ssh -R -c aes128-gcm@openssh.com)
or `pipe2me` (server + pod). Its *relay processes* are the ones that carry
the bytes: the pipe2me server + pod, or the sshd processes of the tunnel's
connection (not the listener) + the ssh client. Nothing here touches the
system's ssh setup: every key, config, pid file and known_hosts lives in
the benchmark's temporary directory.

Python 3.8+, stdlib only. Importing this module has no side effects.
"""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
SERVER_SCRIPT = os.path.join(REPO_DIR, "pipe2me_server.py")
POD_SCRIPT = os.path.join(REPO_DIR, "pipe2me_pod.py")
SSHD = "/usr/sbin/sshd"
AES_CIPHER = "aes128-gcm@openssh.com"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A path or a measurement could not be set up; the message says why."""


# =====================================================================
# PROCESSES — start, wait for a readiness line, stop by PID
# =====================================================================

def _die_with_parent():
    """Ask the kernel to SIGTERM the child if the benchmark dies (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)        # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Process:
    """One started process; stdout and stderr go to files in `log_dir`."""

    def __init__(self, name, argv, log_dir, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.out_path = os.path.join(log_dir, name + ".out")
        self.err_path = os.path.join(log_dir, name + ".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=env, cwd=cwd, start_new_session=True,
                preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def output(self, which="err"):
        path = self.err_path if which == "err" else self.out_path
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines=5):
        text = (self.output("out") + self.output("err")).strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def wait_for(self, pattern, which="err", timeout_s=START_TIMEOUT_S):
        """Return the first match of regex `pattern` in the output."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output(which))
            if match:
                return match
            if not self.alive():
                raise BenchError("%s exited with %s before printing %r: %s" % (
                    self.name, self.popen.returncode, pattern, self.tail()))
            time.sleep(POLL_INTERVAL_S)
        raise BenchError("%s printed no %r within %.0f s: %s" % (
            self.name, pattern, timeout_s, self.tail()))

    def tree(self):
        return process_tree(self.pid) if self.alive() else []

    def stop(self):
        """SIGTERM the process, then any descendant left, by PID; idempotent."""
        pids = self.tree()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        for pid in pids[1:]:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_pid_exists(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        for pid in pids[1:]:
            _signal_pid(pid, signal.SIGKILL)


def _signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pid_exists(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ProcessGroup:
    """Every process the benchmark started, stopped in reverse order."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.processes = []

    def start(self, name, argv, env=None, cwd=None):
        proc = Process(name, argv, self.log_dir, env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def stop(self, proc):
        proc.stop()
        if proc in self.processes:
            self.processes.remove(proc)

    def stop_all(self):
        while self.processes:
            self.processes.pop().stop()


def run_command(argv, timeout_s=60.0, env=None, cwd=None):
    """Run a short command; return stdout; BenchError with stderr if it fails."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout_s, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise BenchError("%s took more than %.0f s" % (argv[0], timeout_s))
    except OSError as exc:
        raise BenchError("cannot run %s: %s" % (argv[0], exc))
    if done.returncode != 0:
        raise BenchError("%s exited %d: %s" % (
            " ".join(argv[:4]), done.returncode,
            done.stderr.decode("utf-8", "replace").strip()[-400:]))
    return done.stdout.decode("utf-8", "replace")


# =====================================================================
# PROC ACCOUNTING — CPU, memory and descriptors of process trees
# =====================================================================

def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def process_tree(root_pid):
    """root_pid and all its live descendants, root first."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    result, todo = [], [root_pid]
    while todo and len(result) < 10000:
        pid = todo.pop()
        result.append(pid)
        todo.extend(children.get(pid, []))
    return result


def cpu_seconds(pids):
    """utime+stime of `pids`, plus reaped children (cutime+cstime)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def memory_bytes(pids):
    """(RSS, PSS) summed over `pids`, from status and smaps_rollup."""
    rss = pss = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                rss += _kib_field(f.read(), "VmRSS")
            with open("/proc/%d/smaps_rollup" % pid) as f:
                pss += _kib_field(f.read(), "Pss")
        except OSError:
            continue
    return rss, pss


def _kib_field(text, name):
    match = re.search(r"^%s:\s+(\d+) kB" % name, text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def fd_count(pids):
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            continue
    return total


# =====================================================================
# PORTS — free loopback ports (bind port 0 and let go)
# =====================================================================

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count, low=20000, high=32000, attempts=200):
    """A run of `count` consecutive free ports below the ephemeral range."""
    step = max(count, 1)
    seed = (os.getpid() * 7919) % (high - low)
    for attempt in range(attempts):
        base = low + (seed + attempt * 97 * step) % (high - low - step)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise BenchError("no %d consecutive free ports in %d..%d" % (count, low, high))


def port_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_echo(port, timeout_s=START_TIMEOUT_S, host="127.0.0.1"):
    """Wait until a stream through `port` echoes; BenchError otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"Eready?")
                got = b""
                while len(got) < 7:
                    chunk = sock.recv(7 - len(got))
                    if not chunk:
                        break
                    got += chunk
                if got == b"Eready?":
                    return
                last = "got %r" % got
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError("nothing echoes through port %d after %.0f s (%s)"
                     % (port, timeout_s, last))


# =====================================================================
# SERVICE AND DELAY RELAY — the benchmark's own helper processes
# =====================================================================

def start_service(group):
    proc = group.start("echo_service", [
        sys.executable, os.path.join(BENCH_DIR, "echo_service.py"),
        "--host", "127.0.0.1", "--port", "0"])
    port = int(proc.wait_for(r"listening [\d.]+:(\d+)", "out").group(1))
    wait_echo(port)
    return proc, port


def start_delay_relay(group, name, target_port, delay_ms=10.0):
    proc = group.start(name, [
        sys.executable, os.path.join(BENCH_DIR, "delay_relay.py"),
        "--listen", "127.0.0.1:0", "--target", "127.0.0.1:%d" % target_port,
        "--delay-ms", str(delay_ms)])
    port = int(proc.wait_for(r"listening [\d.]+:(\d+)", "out").group(1))
    return proc, port


# =====================================================================
# PATHS — direct, ssh -R and pipe2me; each knows its relay processes
# =====================================================================

class Path:
    """A way to reach the service. `port` is where consumers connect."""
    name = "?"
    label = "?"
    port = None

    def relay_pids(self):
        """PIDs (trees expanded) whose CPU and memory count for this path."""
        return []

    def pod_pids(self):
        """The pod side alone (pipe2me pod, ssh client)."""
        return []

    def check_alive(self):
        """Raise BenchError if a relay process has died."""

    def enable_delay(self, group, delay_ms):
        """Route pod<->server through a delay relay; return a note or None."""
        raise BenchError("%s has no pod-to-server link to delay" % self.label)


class DirectPath(Path):
    name = "direct"
    label = "direct"

    def __init__(self, service_port):
        self.port = service_port


class SshPath(Path):
    """A private sshd on a loopback port plus `ssh -N -R`."""

    def __init__(self, group, work_dir, service_port, cipher=None):
        self.name = "ssh-aes" if cipher else "ssh"
        self.label = "ssh -R %s" % cipher if cipher else "ssh -R"
        self.group = group
        self.cipher = cipher
        self.dir = os.path.join(work_dir, self.name)
        self.service_port = service_port
        os.makedirs(self.dir, mode=0o700)
        self.user = _current_user()
        self._make_keys()
        self.sshd_port = free_port()
        self.sshd = self._start_sshd()
        self.port = free_port()
        self.client = self._start_client(self.sshd_port, self.port, "client")

    def _make_keys(self):
        for name in ("host_ed25519", "user_ed25519"):
            run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                         "-C", "pipe2me-bench", "-f", os.path.join(self.dir, name)])
        shutil.copy(os.path.join(self.dir, "user_ed25519.pub"),
                    os.path.join(self.dir, "authorized_keys"))

    def _sshd_config(self):
        lines = [
            "Port %d" % self.sshd_port, "ListenAddress 127.0.0.1",
            "HostKey %s/host_ed25519" % self.dir,
            "PidFile %s/sshd.pid" % self.dir,
            "AuthorizedKeysFile %s/authorized_keys" % self.dir,
            "StrictModes no", "UsePAM no", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
            "GatewayPorts no", "X11Forwarding no", "AllowAgentForwarding no",
            "PermitTTY no", "PrintMotd no", "UseDNS no", "LogLevel ERROR",
        ]
        path = os.path.join(self.dir, "sshd_config")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _start_sshd(self):
        config = self._sshd_config()
        run_command([SSHD, "-t", "-f", config])
        proc = self.group.start(self.name + "-sshd", [
            SSHD, "-D", "-f", config, "-E", os.path.join(self.dir, "sshd.log")])
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _banner(self.sshd_port).startswith(b"SSH-"):
                return proc
            if not proc.alive():
                break
            time.sleep(POLL_INTERVAL_S)
        raise BenchError("sshd did not come up on port %d: %s %s" % (
            self.sshd_port, proc.tail(), _read(os.path.join(self.dir, "sshd.log"))))

    def _start_client(self, ssh_port, public_port, name):
        argv = ["ssh", "-F", "none", "-N", "-T",
                "-R", "%d:127.0.0.1:%d" % (public_port, self.service_port),
                "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=%s/known_hosts" % self.dir,
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "ControlMaster=no", "-o", "ControlPath=none",
                "-o", "LogLevel=ERROR",
                "-i", os.path.join(self.dir, "user_ed25519"),
                "-p", str(ssh_port)]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv.append("%s@127.0.0.1" % self.user)
        proc = self.group.start("%s-%s" % (self.name, name), argv)
        try:
            wait_echo(public_port, timeout_s=30)
        except BenchError as exc:
            raise BenchError("%s: %s; ssh says: %s" % (self.label, exc, proc.tail()))
        return proc

    def relay_pids(self):
        # The listener (root of the tree) is left out: it serves logins
        # whether or not a tunnel exists; the tunnel lives in its children.
        return self.sshd.tree()[1:] + self.client.tree()

    def pod_pids(self):
        return self.client.tree()

    def check_alive(self):
        for proc in (self.sshd, self.client):
            if not proc.alive():
                raise BenchError("%s: %s exited: %s" % (self.label, proc.name, proc.tail()))

    def enable_delay(self, group, delay_ms):
        """A second ssh client reaches sshd through the delay relay."""
        relay, relay_port = start_delay_relay(group, self.name + "-delay", self.sshd_port, delay_ms)
        self.group.stop(self.client)
        self.port = free_port()
        self.client = self._start_client(relay_port, self.port, "client-delayed")
        return None


def _banner(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(64)
    except OSError:
        return b""


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()[-400:]
    except OSError:
        return ""


def _current_user():
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def ensure_privsep_dir():
    """sshd run as root needs /run/sshd; return True if we created it."""
    if os.getuid() != 0 or os.path.isdir("/run/sshd"):
        return False
    os.makedirs("/run/sshd", mode=0o755)
    return True


def sshd_missing_reason(install):
    """None if sshd is usable (installing it when `install`), else why not."""
    if os.access(SSHD, os.X_OK):
        return None
    if not install:
        return ("%s not found: install it with `apt-get install openssh-server` "
                "or run with --install" % SSHD)
    install_openssh_server()
    return None if os.access(SSHD, os.X_OK) else "openssh-server install left no %s" % SSHD


def install_openssh_server():
    """apt-get install openssh-server without starting the system's sshd.

    /usr/sbin/policy-rc.d (the Debian hook that tells maintainer scripts not
    to start services) is put in place only for the install, and only if
    none exists.
    """
    if os.getuid() != 0:
        raise BenchError("--install needs root (apt-get); or install openssh-server yourself")
    policy = "/usr/sbin/policy-rc.d"
    created = False
    if not os.path.exists(policy):
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
        created = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        print("installing openssh-server with apt-get ...", file=sys.stderr)
        run_command(["apt-get", "update", "-qq"], timeout_s=600, env=env)
        run_command(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
                     "-qq", "--no-install-recommends", "openssh-server"],
                    timeout_s=600, env=env)
    finally:
        if created:
            os.remove(policy)


class Pipe2mePath(Path):
    """pipe2me server + pod, default (secure) configuration."""
    name = "pipe2me"
    label = "pipe2me"

    def __init__(self, group, work_dir, service_port):
        self.group = group
        self.service_port = service_port
        self.state_dir = os.path.join(work_dir, "pipe2me-server")
        self.pod_dir = os.path.join(work_dir, "pipe2me-pod")
        os.makedirs(self.state_dir, mode=0o700)
        os.makedirs(self.pod_dir, mode=0o700)
        self.server = self._start_server()
        self.fqdn, self.port = self._setup_pod()
        self.pod_env = None
        self.pod = self._start_pod("pipe2me-pod")

    def _start_server(self):
        self.http_port, self.https_port, self.tunnel_port = (
            free_port(), free_port(), free_port())
        base = free_port_range(8)
        proc = self.group.start("pipe2me-server", [
            sys.executable, SERVER_SCRIPT, "--state-dir", self.state_dir,
            "--listen-address", "127.0.0.1",
            "--http-port", str(self.http_port), "--https-port", str(self.https_port),
            "--tunnel-port", str(self.tunnel_port),
            "--tunnel-ports", "%d...%d" % (base, base + 8)])
        proc.wait_for(r"ready")
        self.token = proc.wait_for(r"token:\s*(\S+)", "out", timeout_s=10).group(1)
        return proc

    def _pod(self, *args):
        return [sys.executable, POD_SCRIPT, "--dir", self.pod_dir] + list(args)

    def _setup_pod(self):
        out = run_command(self._pod(
            "setup", "--server", "http://127.0.0.1:%d" % self.http_port,
            "--auth", self.token, "--protocols", "tcp",
            "--local-ports", str(self.service_port)))
        fqdn = out.strip().splitlines()[-1].strip() if out.strip() else "?"
        env = parse_env(run_command(self._pod("env")))
        url = env.get("PIPE2ME_URLS_0", "")
        match = re.match(r"tcp://[^:/]+:(\d+)$", url)
        if not match:
            raise BenchError("pipe2me_pod.py env gave no tcp URL (PIPE2ME_URLS_0=%r)" % url)
        self.tunnel_endpoint = env.get("PIPE2ME_TUNNEL", "")
        return fqdn, int(match.group(1))

    def _start_pod(self, name):
        proc = self.group.start(name, self._pod("start"), env=self.pod_env)
        proc.wait_for(r"tunnel up")
        wait_echo(self.port, timeout_s=30)
        return proc

    def relay_pids(self):
        return self.server.tree() + self.pod.tree()

    def pod_pids(self):
        return self.pod.tree()

    def check_alive(self):
        for proc in (self.server, self.pod):
            if not proc.alive():
                raise BenchError("pipe2me: %s exited: %s" % (proc.name, proc.tail()))

    def enable_delay(self, group, delay_ms):
        """Restart the pod with PIPE2ME_TUNNEL pointing at a delay relay.

        The caller proves with a round trip that the delay is in the path.
        """
        _relay, relay_port = start_delay_relay(group, "pipe2me-delay", self.tunnel_port, delay_ms)
        self.group.stop(self.pod)
        self.pod_env = dict(os.environ, PIPE2ME_TUNNEL="127.0.0.1:%d" % relay_port)
        self.pod = self._start_pod("pipe2me-pod-delayed")
        return "PIPE2ME_TUNNEL=127.0.0.1:%d was not honoured" % relay_port


def parse_env(text):
    """KEY='value' lines (optionally `export `) into a dict."""
    result = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not match:
            continue
        try:
            words = shlex.split(match.group(2))
        except ValueError:
            continue
        result[match.group(1)] = words[0] if words else ""
    return result


def pipe2me_missing_reason():
    """None if both scripts exist and the pod has a `start` command."""
    for path in (SERVER_SCRIPT, POD_SCRIPT):
        if not os.path.exists(path):
            return "%s does not exist yet" % os.path.basename(path)
    try:
        text = run_command([sys.executable, POD_SCRIPT, "--help"], timeout_s=20)
    except BenchError as exc:
        return "pipe2me_pod.py --help failed: %s" % exc
    if not re.search(r"\bstart\b", text):
        return "pipe2me_pod.py has no `start` command yet"
    return None
