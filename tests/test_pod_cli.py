"""Pod command line: argument checks, .inc files, env, --server, service output.

None of these tests needs a pipe2me server: checks that must happen before
the server is contacted are run against a listening socket that must stay
untouched.
"""

import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_SCRIPT = os.path.join(ROOT, "pipe2me_pod.py")
RUN_TIMEOUT_S = 30


def _load_pod():
    spec = importlib.util.spec_from_file_location("pipe2me_pod_cli_under_test", POD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pod = _load_pod()


def run_pod(*args, env=None, stdin=subprocess.DEVNULL):
    """Run the pod script as a process; (exit code, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.pop("PIPE2ME_DIR", None)
    full_env.update(env or {})
    done = subprocess.run([sys.executable, POD_SCRIPT] + list(args), stdin=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=full_env, timeout=RUN_TIMEOUT_S, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def assert_one_line_error(code, stderr, expected_code, fragment):
    assert code == expected_code, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pipe2me: "), stderr
    assert fragment in lines[0]
    assert "Traceback" not in stderr


@pytest.fixture
def untouched_server():
    """A listening socket posing as the server; yields its URL, then proves nobody connected."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        yield "http://127.0.0.1:%d" % listener.getsockname()[1]
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 where nothing listens."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


INFO_TEXT = """\
# written by hand for a test
PIPE2ME_ID='0123456789abcdef'
PIPE2ME_FQDN='calm-teal-otter.pipe2.localhost'
PIPE2ME_URLS_0='http://calm-teal-otter.pipe2.localhost:10000'
PIPE2ME_URLS_1='https://calm-teal-otter.pipe2.localhost:10001'
PIPE2ME_TUNNEL='127.0.0.1:8444'
PIPE2ME_TUNNEL_DOMAIN='pipe2.localhost'
PIPE2ME_EXPIRES_AT='1900000000'
PIPE2ME_SECRET='s3cr3t-never-shown'
"""

LOCAL_TEXT = """\
PIPE2ME_SERVER='http://127.0.0.1:8080'
PIPE2ME_LOCAL_PORTS='8100,8101'
"""


@pytest.fixture
def pod_dir(tmp_path):
    """A pod directory with hand-written .inc files (no key or certificates)."""
    (tmp_path / "pipe2me.info.inc").write_text(INFO_TEXT)
    (tmp_path / "pipe2me.local.inc").write_text(LOCAL_TEXT)
    return tmp_path


# -- arguments ---------------------------------------------------------------


def test_cli_no_command_is_one_line_usage_error():
    code, out, err = run_pod()
    assert_one_line_error(code, err, 2, "COMMAND")
    assert out == ""


def test_cli_unknown_option_is_one_line_usage_error():
    code, _, err = run_pod("env", "--no-such-option")
    assert_one_line_error(code, err, 2, "--no-such-option")


def test_cli_silent_hides_the_error_line(tmp_path):
    code, out, err = run_pod("--silent", "--dir", str(tmp_path), "env")
    assert (code, out, err) == (2, "", "")


def test_cli_global_options_accepted_after_the_command(pod_dir):
    code, out, err = run_pod("env", "--dir", str(pod_dir), "-q")
    assert code == 0, err
    assert "PIPE2ME_FQDN='calm-teal-otter.pipe2.localhost'" in out


def test_cli_dir_defaults_to_pipe2me_dir_env(pod_dir):
    code, out, err = run_pod("env", env={"PIPE2ME_DIR": str(pod_dir)})
    assert code == 0, err
    assert "PIPE2ME_ID='0123456789abcdef'" in out


def test_cli_start_without_setup_fails_cleanly(tmp_path):
    code, _, err = run_pod("--dir", str(tmp_path), "start")
    assert_one_line_error(code, err, 2, "no setup")


# -- setup refusals before the server is contacted ----------------------------


@pytest.mark.parametrize("name", pod.POD_FILES)
def test_setup_refuses_a_dir_with_a_setup(tmp_path, untouched_server, name):
    (tmp_path / name).write_text("x\n")
    code, out, err = run_pod("--dir", str(tmp_path), "setup", "--server", untouched_server,
                             "--auth", "t0ken")
    assert_one_line_error(code, err, 2, "already holds a setup")
    assert out == ""
    assert sorted(os.listdir(str(tmp_path))) == [name]


def test_setup_refuses_a_missing_token(tmp_path, untouched_server):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "-s", untouched_server)
    assert_one_line_error(code, err, 2, "missing token")


def test_setup_refuses_a_missing_server(tmp_path):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "--token", "t0ken")
    assert_one_line_error(code, err, 2, "missing server")


@pytest.mark.parametrize("protocols", ["gopher", "http,,https", "", "https,ftp"])
def test_setup_refuses_unknown_protocols(tmp_path, untouched_server, protocols):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "--server", untouched_server,
                           "--auth", "t0ken", "--protocols", protocols)
    assert_one_line_error(code, err, 2, "bad protocol")


@pytest.mark.parametrize("protocols,ports", [
    ("http,https", "8100"), ("https", "8100,8101"), ("http,https,ssh", "1,2")])
def test_setup_refuses_port_count_mismatch(tmp_path, untouched_server, protocols, ports):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "--server", untouched_server,
                           "--auth", "t0ken", "--protocols", protocols, "--ports", ports)
    assert_one_line_error(code, err, 2, "one port per protocol")


@pytest.mark.parametrize("ports", ["0", "65536", "http", "80;81", "\u00b2", "-1"])
def test_setup_refuses_bad_local_ports(tmp_path, untouched_server, ports):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "--server", untouched_server,
                           "--auth", "t0ken", "--local-ports", ports)
    assert_one_line_error(code, err, 2, "bad port")


def test_setup_names_the_package_when_openssl_is_missing(tmp_path, untouched_server):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    code, _, err = run_pod("--dir", str(tmp_path / "pod"), "setup", "--server", untouched_server,
                           "--auth", "t0ken", env={"PATH": str(empty_bin)})
    assert_one_line_error(code, err, 2, "openssl")
    assert "'openssl' (Debian/Ubuntu)" in err and "'openssl-util' (OpenWrt)" in err
    assert not (tmp_path / "pod").exists()


def test_setup_reports_an_unreachable_server(tmp_path, closed_port):
    target = tmp_path / "pod"
    code, out, err = run_pod("--dir", str(target), "setup", "--server",
                             "http://127.0.0.1:%d" % closed_port, "--auth", "t0ken")
    assert_one_line_error(code, err, 3,
                          "server unreachable: http://127.0.0.1:%d: " % closed_port)
    assert out == ""
    assert not target.exists()


def test_setup_refuses_an_unreadable_cacert(tmp_path, untouched_server):
    code, _, err = run_pod("--dir", str(tmp_path), "setup", "--server",
                           untouched_server.replace("http:", "https:"), "--auth", "t0ken",
                           "--cacert", str(tmp_path / "missing.pem"))
    assert_one_line_error(code, err, 2, "missing.pem")


# -- --server normalization ------------------------------------------------------


@pytest.mark.parametrize("given,expected", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://Pipe2.Example.ORG", "https://pipe2.example.org"),
    ("HTTPS://pipe2.example.org:8443/", "https://pipe2.example.org:8443"),
    ("pipe2.example.org", "https://pipe2.example.org"),
    ("pipe2.example.org:8443", "https://pipe2.example.org:8443"),
    ("127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("[::1]:8443", "https://[::1]:8443"),
    ("::1", "https://[::1]"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("  http://localhost:8080/api/ ", "http://localhost:8080/api"),
])
def test_server_url_normalized(given, expected):
    assert pod.normalize_server_url(given) == expected


@pytest.mark.parametrize("given", [
    "", "ftp://example.org", "http://", "example.org:99999", "example.org:0",
    "example.org:port", "http://user@example.org", "http://example.org/?x=1",
    "http://exa mple.org", "[::zz]:8443"])
def test_server_url_refused(given):
    with pytest.raises(pod.UsageError):
        pod.normalize_server_url(given)


def test_server_tunnel_endpoint_uses_the_server_host():
    assert pod.tunnel_endpoint("https://pipe2.example.org:8443", 8444) == "pipe2.example.org:8444"
    assert pod.tunnel_endpoint("http://[::1]:8080", 8444) == "[::1]:8444"


# -- .inc files and env --------------------------------------------------------------

TRICKY_VALUES = ["plain", "with space", "it's", "$HOME `id` $(id)", "back\\slash",
                 "'", "", "tab\there", "semi;colon && true", "*"]


def test_inc_round_trips_through_the_parser():
    values = {"PIPE2ME_V%d" % i: v for i, v in enumerate(TRICKY_VALUES)}
    assert pod.parse_inc(pod.format_inc(values, "comment"), "test") == values


def test_inc_round_trips_through_sh(tmp_path):
    values = {"PIPE2ME_V%d" % i: v for i, v in enumerate(TRICKY_VALUES)}
    path = tmp_path / "values.inc"
    path.write_text(pod.format_inc(values))
    script = ". %s\n" % path + "".join(
        'printf "%%s\\0" "$%s"\n' % key for key in values)
    done = subprocess.run(["sh", "-c", script], stdout=subprocess.PIPE,
                          timeout=RUN_TIMEOUT_S, check=True)
    assert done.stdout.decode().split("\0")[:-1] == TRICKY_VALUES


def test_inc_parser_accepts_sh_spellings():
    text = "export PIPE2ME_A=plain\nPIPE2ME_B=\"double quoted\"\nPIPE2ME_C=\n" \
           "PIPE2ME_D='x' # comment\n\n   # indented comment\n"
    assert pod.parse_inc(text, "t") == {"PIPE2ME_A": "plain", "PIPE2ME_B": "double quoted",
                                        "PIPE2ME_C": "", "PIPE2ME_D": "x"}


@pytest.mark.parametrize("line", ["PIPE2ME_A='unclosed", "not a setting", "PIPE2ME_A=two words",
                                  "1BAD=x"])
def test_inc_parser_names_file_and_line(line):
    with pytest.raises(pod.UsageError) as caught:
        pod.parse_inc("PIPE2ME_OK=1\n" + line + "\n", "some.inc")
    assert "some.inc line 2" in str(caught.value)


def test_env_prints_the_settings_without_the_secret(pod_dir):
    code, out, err = run_pod("--dir", str(pod_dir), "env")
    assert code == 0, err
    assert out.splitlines() == [
        "PIPE2ME_SERVER='http://127.0.0.1:8080'",
        "PIPE2ME_ID='0123456789abcdef'",
        "PIPE2ME_FQDN='calm-teal-otter.pipe2.localhost'",
        "PIPE2ME_URLS_0='http://calm-teal-otter.pipe2.localhost:10000'",
        "PIPE2ME_URLS_1='https://calm-teal-otter.pipe2.localhost:10001'",
        "PIPE2ME_TUNNEL='127.0.0.1:8444'",
        "PIPE2ME_LOCAL_PORTS='8100,8101'",
        "PIPE2ME_PROXY_PROTOCOL='off'",
    ]
    assert "s3cr3t" not in out + err


def test_env_output_survives_eval_in_sh(pod_dir):
    odd_server = "http://127.0.0.1:8080/it's $HOME"
    (pod_dir / "pipe2me.local.inc").write_text(pod.format_inc(
        {"PIPE2ME_SERVER": odd_server, "PIPE2ME_LOCAL_PORTS": "8100,8101"}))
    script = 'eval $("$0" "$1" --dir "$2" env) && printf "%s|%s|%s" ' \
             '"$PIPE2ME_SERVER" "$PIPE2ME_URLS_1" "$PIPE2ME_LOCAL_PORTS"'
    done = subprocess.run(["sh", "-c", script, sys.executable, POD_SCRIPT, str(pod_dir)],
                          stdout=subprocess.PIPE, timeout=RUN_TIMEOUT_S, check=True)
    assert done.stdout.decode() == "%s|%s|%s" % (
        odd_server, "https://calm-teal-otter.pipe2.localhost:10001", "8100,8101")


def test_env_without_setup_says_so(tmp_path):
    code, out, err = run_pod("--dir", str(tmp_path), "env")
    assert_one_line_error(code, err, 2, "no setup in %s" % tmp_path)
    assert out == ""


def test_env_refuses_a_damaged_info_file(pod_dir):
    (pod_dir / "pipe2me.info.inc").write_text(INFO_TEXT.replace("PIPE2ME_FQDN=", "PIPE2ME_XX="))
    code, _, err = run_pod("--dir", str(pod_dir), "env")
    assert_one_line_error(code, err, 2, "lacks PIPE2ME_FQDN")


def test_setup_services_pair_urls_with_local_ports(pod_dir):
    setup = pod.read_setup(pod.PodFiles(str(pod_dir)))
    assert [(s.protocol, s.public_port, s.local_port) for s in setup.services()] == [
        ("http", 10000, 8100), ("https", 10001, 8101)]


# -- files, openssl ---------------------------------------------------------------------


def test_files_written_atomically_with_mode(tmp_path):
    target = tmp_path / "secret.inc"
    target.write_text("old\n")
    os.chmod(str(target), 0o644)
    pod.write_file_atomic(str(target), "new\n", 0o600)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(str(tmp_path)) == ["secret.inc"]


def test_files_write_failure_is_a_usage_error(tmp_path):
    with pytest.raises(pod.UsageError) as caught:
        pod.write_file_atomic(str(tmp_path / "no-such-dir" / "x"), "data")
    assert "cannot write" in str(caught.value)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_failure_carries_its_last_stderr_line(tmp_path):
    with pytest.raises(pod.Pipe2meError) as caught:
        pod.run_openssl(["x509", "-noout", "-in", str(tmp_path / "missing.pem")])
    message = str(caught.value)
    assert message.startswith("openssl x509 failed (exit 1): ")
    assert len(message) > len("openssl x509 failed (exit 1): ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_key_and_csr_for_the_fqdn(tmp_path):
    key_path = str(tmp_path / "key.pem")
    pod.write_file_atomic(key_path, pod.make_key(), 0o600)
    csr = pod.make_csr(key_path, "calm-teal-otter.pipe2.localhost")
    subject = pod.run_openssl(["req", "-noout", "-subject", "-nameopt", "RFC2253"],
                              input_bytes=csr.encode())
    assert subject.decode().strip() == "subject=CN=calm-teal-otter.pipe2.localhost"
    text = pod.run_openssl(["pkey", "-in", key_path, "-noout", "-text"]).decode()
    assert "P-256" in text or "prime256v1" in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_cert_renewal_due_after_a_third_of_the_lifetime(tmp_path):
    key_path, cert_path = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    pod.write_file_atomic(key_path, pod.make_key(), 0o600)
    pod.write_file_atomic(cert_path, pod.run_openssl(
        ["req", "-new", "-x509", "-key", key_path, "-subj", "/CN=t.pipe2.localhost",
         "-days", "3"]))
    not_before, not_after = pod.cert_validity(cert_path)
    lifetime = not_after - not_before
    assert lifetime == 3 * 86400
    assert not pod.cert_needs_renewal(cert_path, now=not_before + lifetime * 0.3)
    assert pod.cert_needs_renewal(cert_path, now=not_before + lifetime * 0.4)
    assert pod.cert_needs_renewal(str(tmp_path / "missing.pem"))


# -- clear, service ----------------------------------------------------------------------


def test_clear_without_yes_refuses_without_a_terminal(pod_dir):
    code, _, err = run_pod("--dir", str(pod_dir), "clear")
    assert_one_line_error(code, err, 2, "--yes")
    assert (pod_dir / "pipe2me.info.inc").exists()


def test_clear_without_setup_says_so(tmp_path):
    code, _, err = run_pod("--dir", str(tmp_path), "clear", "--yes")
    assert_one_line_error(code, err, 2, "nothing to clear")


def test_clear_removes_leftovers_without_info(tmp_path, untouched_server):
    (tmp_path / "pipe2me.openssl.priv").write_text("k\n")
    (tmp_path / "pipe2me.cacert").write_text("c\n")
    (tmp_path / "other.txt").write_text("keep\n")
    code, _, err = run_pod("--dir", str(tmp_path), "clear", "--yes")
    assert code == 0, err
    assert os.listdir(str(tmp_path)) == ["other.txt"]


def test_clear_removes_a_damaged_port_map_file_with_a_warning(tmp_path, untouched_server):
    """A pipe2me.portmap.json that is damaged (here: a method no pod knows) does
    not stop `clear`: the router's mappings cannot be named, so they are left
    with one warning, and the files go (it ended with exit 2, after the
    server had deleted the tunnel, and every `clear` after failed alike)."""
    (tmp_path / "pipe2me.cacert").write_text("c\n")
    (tmp_path / "pipe2me.portmap.json").write_text(json.dumps({
        "version": 1, "fqdn": "calm-teal-otter.pipe2.localhost", "method": "pcp",
        "gateway": "127.0.0.1", "used": "natpmp", "external_address": "203.0.113.7",
        "lease_end": 0, "mappings": [[8100, 10000]], "lifetime_s": 600, "upnp": None}))
    code, _, err = run_pod("--dir", str(tmp_path), "clear", "--yes")
    assert code == 0 and "Traceback" not in err, err
    assert "port mappings not removed at the router" in err and "is damaged" in err, err
    assert os.listdir(str(tmp_path)) == []


def test_service_requires_exactly_one_kind(pod_dir):
    code, _, err = run_pod("--dir", str(pod_dir), "service")
    assert_one_line_error(code, err, 2, "--systemd")
    code, _, err = run_pod("--dir", str(pod_dir), "service", "--systemd", "--sysv")
    assert_one_line_error(code, err, 2, "not allowed")


def test_service_systemd_runs_start_for_this_dir(pod_dir):
    code, out, err = run_pod("--dir", str(pod_dir), "service", "--systemd")
    assert code == 0, err
    exec_lines = [line for line in out.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_lines) == 1
    assert exec_lines[0].endswith(" %s --dir %s start" % (POD_SCRIPT, pod_dir))
    assert "python" in exec_lines[0]
    assert "Restart=on-failure" in out
    assert "WantedBy=multi-user.target" in out
    assert "calm-teal-otter" in out


def test_service_systemd_escapes_odd_paths(tmp_path):
    odd = tmp_path / "100% $odd dir"
    odd.mkdir()
    code, out, err = run_pod("--dir", str(odd), "service", "--systemd")
    assert code == 0, err
    assert '"%s"' % str(odd).replace("%", "%%").replace("$", "$$") in out


@pytest.mark.parametrize("kind", ["--procd", "--sysv"])
def test_service_init_scripts_are_valid_sh(pod_dir, tmp_path, kind):
    code, out, err = run_pod("--dir", str(pod_dir), "service", kind)
    assert code == 0, err
    assert out.startswith("#!/bin/sh")
    assert "--dir %s start" % pod_dir in out
    script = tmp_path / "init.sh"
    script.write_text(out)
    done = subprocess.run(["sh", "-n", str(script)], stderr=subprocess.PIPE,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr.decode()


def test_service_procd_respawns(pod_dir):
    code, out, _ = run_pod("--dir", str(pod_dir), "service", "--procd")
    assert code == 0
    assert "USE_PROCD=1" in out and "procd_set_param respawn" in out


# -- import has no side effects -----------------------------------------------------


def test_cli_import_configures_no_logging(capsys):
    fresh = _load_pod()
    fresh.log.info("not shown before the CLI sets the level")
    assert capsys.readouterr().err == ""
    fresh.log.warning("shown %s", "always")
    assert capsys.readouterr().err.endswith(" WARNING pipe2me.pod shown always\n")


RUN_AS_MAIN = """
import os, sys
script = sys.argv[1]
del sys.argv[1]
module = {"__name__": "loaded", "__file__": script}
exec(compile(open(script).read(), script, "exec"), module)
module["__name__"] = "__main__"
if os.environ.get("TRACED"):
    sys.settrace(lambda *args: None)
module["run_from_compiled_code"]()
print("not re-executed")
"""


@pytest.mark.parametrize("traced", [False, True])
def test_cli_run_from_compiled_code_re_executes_unless_traced(traced):
    """The script as __main__ re-executes (here into `--help`); under a
    debugger, profiler or coverage tool (a trace function) it runs on."""
    env = dict(os.environ, TRACED="1" if traced else "")
    done = subprocess.run([sys.executable, "-c", RUN_AS_MAIN, POD_SCRIPT, "--help"], env=env,
                          stdout=subprocess.PIPE, timeout=RUN_TIMEOUT_S, check=True)
    out = done.stdout.decode()
    assert ("not re-executed" in out) == traced, out
    assert ("usage: pipe2me_pod.py" in out) == (not traced), out


def test_cli_start_process_holds_no_unneeded_modules():
    """What `start` leaves out to stay small: logging, argparse (its arguments
    are handed over), subprocess and shutil (openssl is not run)."""
    code = ("import sys; sys.argv = [sys.argv[1]]; "
            "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'), {'__name__': 'pod'}); "
            "print(' '.join(sorted(m for m in ('logging', 'argparse', 'subprocess', 'shutil') "
            "if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-S", "-c", code, POD_SCRIPT], stdout=subprocess.PIPE,
                          timeout=RUN_TIMEOUT_S, check=True)
    assert done.stdout.decode().split() == []
