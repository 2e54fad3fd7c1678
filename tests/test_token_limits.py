"""Token options that act on running tunnels: `rate` and `max_traffic`."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SERVER, setup_pod, start_pod, public_ports, wait_until


def add_token(server, name, options):
    subprocess.run([sys.executable, SERVER, "--state-dir", server.state_dir, "tokens", "add",
                    name] + options, check=True, capture_output=True, timeout=30)
    # the admin command SIGHUPs the server; wait until it has reloaded
    server.proc.wait_for(r"reloaded tokens=")


def sink_service():
    """A local service that counts what it receives and sends a count back at EOF."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                total = 0
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    total += len(data)
                conn.sendall(str(total).encode())
    threading.Thread(target=serve, daemon=True).start()
    return listener


def push(port, nbytes, timeout=60):
    """Send nbytes through the tunnel; returns (seconds, what the service counted)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        chunk = b"r" * 65536
        sent = 0
        try:
            while sent < nbytes:
                sock.sendall(chunk[: nbytes - sent])
                sent += min(len(chunk), nbytes - sent)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(64)
        except OSError:
            answer = b""
    return time.monotonic() - start, answer


@pytest.mark.slow
def test_token_rate_caps_tunnel_throughput(server, workdir):
    add_token(server, "rate-token-1", ["rate:1M", "max_ports:1"])
    listener = sink_service()
    pod_dir = workdir + "/pod"
    setup_pod(server, pod_dir, "tcp", [listener.getsockname()[1]], token="rate-token-1")
    pod = start_pod(workdir, pod_dir)
    try:
        seconds, answer = push(public_ports(pod_dir)[0], 4 * 1024 * 1024)
        assert answer == str(4 * 1024 * 1024).encode()
        # 1 MiB/s with a one-second burst: 4 MiB cannot take less than ~3 s
        assert seconds > 2.5, seconds
    finally:
        pod.stop()
        listener.close()


@pytest.mark.slow
def test_token_max_traffic_closes_and_rejects_the_tunnel(server, workdir):
    add_token(server, "traffic-token-1", ["max_traffic:1M", "max_ports:1"])
    listener = sink_service()
    pod_dir = workdir + "/pod"
    setup_pod(server, pod_dir, "tcp", [listener.getsockname()[1]], token="traffic-token-1")
    pod = start_pod(workdir, pod_dir)
    try:
        push(public_ports(pod_dir)[0], 3 * 1024 * 1024, timeout=20)
        server.proc.wait_for(r"traffic allowance used up tunnel=")
        # the pod is refused for good and exits 4
        wait_until(lambda: not pod.alive(), timeout=20, what="pod to exit")
        assert pod.popen.returncode == 4
        assert "traffic allowance" in pod.stderr()
    finally:
        pod.stop()
        listener.close()
