"""A first run that prints the way in (issue 12 point 6): the server's first
start prints a pod command that works where it is pasted, `setup` prints
only the name on stdout and the public URLs on stderr, `start` logs every
public URL, `tokens list` shows names, `tokens add` allows what the
walkthrough needs, the installed commands name themselves, and bad admin
input gets one readable line."""

import os
import re
import shlex
import stat
import subprocess
import sys

from conftest import (POD, ROOT, SERVER, ServerHandle, echo_handler, public_ports, run_pod,
                      start_pod)


def admin(server, *args, env=None):
    return subprocess.run([sys.executable, SERVER, "--state-dir", server.state_dir] + list(args),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=env)


def one_line(done, code):
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def installed_command(bin_dir, name, module):
    """A console script as pip writes it for `[project.scripts]`."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as fh:
        fh.write("#!%s\nimport sys\nsys.path.insert(0, %r)\nfrom %s import main\n"
                 "sys.exit(main())\n" % (sys.executable, ROOT, module))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_first_run_pod_command_works_where_pasted(server, workdir):
    """The printed command, pasted in another directory, sets a pod up."""
    match = re.search(r"^pod command: (.*)$", server.proc.stdout(), re.M)
    assert match, server.proc.stdout()
    argv = shlex.split(match.group(1))
    assert argv[:2] == ["python3", POD], argv
    elsewhere = os.path.join(workdir, "somewhere", "pod")
    os.makedirs(elsewhere)
    argv[argv.index("--server") + 1] = server.url  # the test server's free port, not 8080
    done = subprocess.run(argv, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    fqdn = done.stdout.strip()
    assert done.stdout == fqdn + "\n"  # only the name on stdout
    urls = re.findall(r"public url=(\S+)", done.stderr)
    ports = public_ports(elsewhere)
    assert urls == ["http://%s:%d" % (fqdn, ports[0]), "https://%s:%d" % (fqdn, ports[1]),
                    "http://%s:%d/" % (fqdn, server.http),
                    "https://%s:%d/" % (fqdn, server.https)], done.stderr


def test_first_run_start_logs_every_public_url(server, workdir, services):
    echo = services(echo_handler)
    pod_dir = os.path.join(workdir, "pod")
    os.makedirs(pod_dir)
    setup = run_pod(pod_dir, "setup", "--server", server.url, "--auth", server.token,
                    "--protocols", "http,https,tcp", "--local-ports",
                    "%d,%d,%d" % (echo.port, echo.port, echo.port), check=True)
    fqdn = setup.stdout.strip()
    pod = start_pod(workdir, pod_dir)
    try:
        http, https, tcp = public_ports(pod_dir)
        pod.wait_for(r"public url=https://%s:%d/" % (re.escape(fqdn), server.https))
        assert re.findall(r"public url=(\S+)", pod.stderr()) == [
            "http://%s:%d" % (fqdn, http), "https://%s:%d" % (fqdn, https),
            "tcp://%s:%d" % (fqdn, tcp), "http://%s:%d/" % (fqdn, server.http),
            "https://%s:%d/" % (fqdn, server.https)]
    finally:
        assert pod.stop() == 0


def test_first_run_tokens_list_names_and_added_token_fits_the_walkthrough(server, workdir,
                                                                          services):
    added = admin(server, "tokens", "add", "lifespan:1h")
    assert added.returncode == 0, added.stderr
    name = added.stdout.strip()
    listed = admin(server, "tokens", "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^%s = max_ports:4 " % re.escape(name), listed.stdout, re.M), listed.stdout
    assert re.search(r"^%s = max_ports:4 " % re.escape(server.token), listed.stdout, re.M)
    pod_dir = os.path.join(workdir, "pod")
    os.makedirs(pod_dir)
    done = run_pod(pod_dir, "setup", "--server", server.url, "--auth", name,
                   "--protocols", "http,https", "--local-ports", "8100,8101")
    assert done.returncode == 0, done.stderr  # the README's walkthrough with a new token
    removed = admin(server, "tokens", "remove", name)
    assert removed.returncode == 0, removed.stderr
    assert name not in admin(server, "tokens", "list").stdout


def test_first_run_admin_input_gets_one_readable_line(server):
    line = one_line(admin(server, "tokens", "add", "max_ports:abc"), 2)
    assert line == "pipe2me-server: bad value 'abc' for max_ports: not a number of ports (1 or more)" \
        or re.fullmatch(r"\S+: bad value 'abc' for max_ports: not a number of ports \(1 or more\)",
                        line), line
    for action in ("show", "remove"):
        line = one_line(admin(server, "tunnels", action), 2)
        assert line.endswith("usage: tunnels %s ID (the IDs are in `tunnels list`)" % action), line
        assert "None" not in line
    config = admin(server, "check-config")
    assert config.returncode == 0, config.stderr
    assert "[]" not in config.stdout and "None" not in config.stdout, config.stdout
    assert re.search(r"^PUBLIC_ADDRESS=  #", config.stdout, re.M), config.stdout
    assert re.search(r"^TUNNEL_PORTS=\d+\.\.\d+  #", config.stdout, re.M), config.stdout


def test_first_run_installed_commands_name_themselves(workdir):
    """As pip installs them (console scripts `pipe2me-server` and `pipe2me`):
    the server's pod command and the pod's systemd unit use `pipe2me`."""
    bin_dir = os.path.join(workdir, "bin")
    os.makedirs(bin_dir)
    server_cmd = installed_command(bin_dir, "pipe2me-server", "pipe2me_server")
    pod_cmd = installed_command(bin_dir, "pipe2me", "pipe2me_pod")
    handle = ServerHandle.__new__(ServerHandle)
    from conftest import clean_env, free_port_range
    handle.workdir, handle.state_dir = workdir, os.path.join(workdir, "state")
    handle.tunnel_ports, handle.extra, handle.name = free_port_range(4), [], "server"
    handle.env = clean_env(os.path.join(workdir, "home"))
    handle.env["PATH"] = bin_dir + os.pathsep + handle.env.get("PATH", "")
    argv = ServerHandle.argv(handle)
    handle.argv = lambda: [server_cmd] + argv[2:]
    handle.start()
    try:
        line = re.search(r"^pod command: (.*)$", handle.proc.stdout(), re.M).group(1)
        assert line.startswith("pipe2me setup --server "), line
        pod_dir = os.path.join(workdir, "pod")
        os.makedirs(pod_dir)
        done = subprocess.run([pod_cmd, "--dir", pod_dir, "setup", "--server", handle.url,
                               "--auth", handle.token, "--protocols", "tcp", "--local-ports",
                               "8100"], capture_output=True, text=True, timeout=60,
                              env=handle.env)
        assert done.returncode == 0, done.stderr
        unit = subprocess.run([pod_cmd, "--dir", pod_dir, "service", "--systemd"],
                              capture_output=True, text=True, timeout=60, env=handle.env)
        assert unit.returncode == 0, unit.stderr
        assert re.search(r"^ExecStart=%s --dir %s start$" % (re.escape(pod_cmd),
                                                              re.escape(pod_dir)),
                         unit.stdout, re.M), unit.stdout
        assert "site-packages" not in unit.stdout and POD not in unit.stdout
    finally:
        assert handle.stop() == 0
