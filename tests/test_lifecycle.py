"""A pod's lifecycle (issue 12 point 7), with the real scripts as processes:
one `start` per pod directory, a pod replaced by a copy of itself backs off
and gives up (exit 4) naming the other side, `clear` stops a running
`start` (exit 4), and a service pointed at the tunnel's own public port on
the server is refused before anything connects."""

import os
import re
import shutil

from conftest import (echo_handler, echo_round_trip, public_ports, run_pod, setup_pod,
                      start_pod, wait_until)


def echo_pod_dir(server, workdir, services):
    """A pod directory set up with one tcp tunnel to a fresh echo service."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [services(echo_handler).port])
    return pod_dir


def test_lifecycle_one_start_per_directory(server, workdir, services):
    pod_dir = echo_pod_dir(server, workdir, services)
    first = start_pod(workdir, pod_dir)
    try:
        second = run_pod(pod_dir, "start", timeout=30)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert re.search(r"another `start` runs for .* \(pid %d\): one start per pod directory"
                         % first.pid, line), line
        assert first.alive()
        (port,) = public_ports(pod_dir)
        assert echo_round_trip(port) == b"ping through pipe2me\n"
    finally:
        assert first.stop() == 0


def test_lifecycle_replaced_pod_backs_off_and_gives_up(server, workdir, services):
    """A copied pod directory: the second pod takes the tunnel over; the first
    is told by whom, backs off, and exits 4 after a few rounds, without
    taking the tunnel back; the second stays connected throughout."""
    pod_dir = echo_pod_dir(server, workdir, services)
    copy = os.path.join(workdir, "copy")
    shutil.copytree(pod_dir, copy)
    first = start_pod(workdir, pod_dir, "--reconnect-delay", "0.1", name="first")
    second = start_pod(workdir, copy, name="second")
    try:
        first.wait_for(r"replaced by another connection of this tunnel from=127\.0\.0\.1:\d+ "
                       r"round=1 retry_in=")
        code = first.popen.wait(60)
        assert code == 4, first.stderr()[-2000:]
        last = first.stderr().strip().splitlines()[-1]
        assert re.match(r"pipe2me: tunnel \S+ is held by another connection from 127\.0\.0\.1:\d+ "
                        r"\(replaced 4 times\): another pod runs with this tunnel's key", last), last
        rounds = re.findall(r"round=(\d) retry_in=([\d.]+)s", first.stderr())
        assert rounds == [("1", "0.2"), ("2", "0.4"), ("3", "0.8")], rounds  # it backs off
        assert second.stderr().count("tunnel up") == 1, second.stderr()
        assert "tunnel down" not in second.stderr()
        (port,) = public_ports(pod_dir)
        assert echo_round_trip(port) == b"ping through pipe2me\n"
        handshakes = server.proc.stderr().count("pod connected")
        assert handshakes <= 3, handshakes  # no fight: the first never took the tunnel back
    finally:
        first.stop()
        assert second.stop() == 0


def test_lifecycle_clear_stops_a_running_start(server, workdir, services):
    pod_dir = echo_pod_dir(server, workdir, services)
    pod = start_pod(workdir, pod_dir)
    try:
        done = run_pod(pod_dir, "clear", "--yes", timeout=60)
        assert done.returncode == 0, done.stderr
        assert "the running start stopped pid=%d" % pod.pid in done.stderr
        assert pod.popen.wait(20) == 4
        last = pod.stderr().strip().splitlines()[-1]
        assert re.match(r"pipe2me: (server: tunnel \S+ deleted|the setup in .* is gone)", last), last
    finally:
        pod.stop()


def test_lifecycle_refuses_its_own_public_port(server, workdir):
    """On the server's own host, the default local ports (the public ones)
    would connect consumers back to the server: `start` refuses at once."""
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp")
    (port,) = public_ports(pod_dir)
    done = run_pod(pod_dir, "start", timeout=30)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line == ("pipe2me: local target %d of the tcp service is this tunnel's own public "
                    "port %d on the server: give the service's real port (PIPE2ME_LOCAL_PORTS "
                    "in pipe2me.local.inc, or --local-ports at setup)" % (port, port)), line
    assert "pod connected" not in server.proc.stderr()
