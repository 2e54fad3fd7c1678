#!/usr/bin/env python3
# SPDX-License-Identifier: AGPL-3.0-only
"""pipe2me server: publishes TCP services of pods behind NAT under one domain.

Usage:
    python3 pipe2me_server.py [--config FILE] [--KEY-NAME VALUE ...]   run the server
    python3 pipe2me_server.py tokens list|add NAME [OPTION:VALUE ...]|remove NAME
    python3 pipe2me_server.py tunnels list|show ID|remove ID
    python3 pipe2me_server.py check-config | dns-refresh
    python3 pipe2me_server.py service --systemd|--sysv [--user NAME]   boot definition

Every pod gets a three-word name under TUNNEL_DOMAIN, one public port per
service, and a certificate for its name signed by the server's CA. Pods keep
one mutually authenticated TLS connection to TUNNEL_PORT; each consumer that
connects to a public port (or to the HTTP/HTTPS fronts by name) becomes a
stream multiplexed over that connection.

Sections, in the order a tunnel comes to life:
    SHARED base      the exception tree and exit codes, the service protocols,
                     the host-name check, atomic files, the openssl wrapper
    SETTINGS         configuration keys, defaults, parsing and validation
    HELPERS          JSON files, shell format, addresses, name words, bound sockets
    SHARED protocol  the wire contract
    SHARED relay     the selector loop and the stream relay
    SHARED process   descriptor limit and the re-exec from compiled code
    TOKENS           tokens.conf: who may create tunnels, within which limits
    STATE STORE      STATE_DIR/tunnels/*.json, the port pool, the state lock,
                     who is connected
    CERTIFICATES     the CA, CSR checks, signing through the openssl CLI,
                     which certificates of a tunnel connect, the signing limit
    ACME             publicly trusted certificates for pods' own keys and the
                     server's name from an ACME CA (RFC 8555), renewed (ARI)
    API              the HTTP API (JSON and shell format) and its threads
    TUNNEL SESSIONS  pod authentication, the live session per tunnel, the
                     public ports of online tunnels
    FRONTS           the HTTP front (a reverse proxy routing each request by
                     Host), the SNI front
    REACHABILITY     direct or relayed: probing a pod's router on every port
    DNS              what each tunnel's name answers, the built-in
                     authoritative responder (rate limited, fair shares)
    DNSIMPLE         the tunnels' records at dnsimple, reconciled in a thread
    WIRING           the Server object: listeners, signals, sweeps
    CLI              admin commands and main()

The SHARED blocks are byte-identical in pipe2me_pod.py.

Glossary: server, pod, consumer (connects to a public port), tunnel (a pod's
name, ports and certificate), service (one protocol and port of a tunnel),
stream (one consumer connection carried to the pod), token, store, CA.

Requires Python 3.9+ and the openssl command-line tool.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import contextlib
import datetime
import email.utils
import enum
import errno
import fcntl
import functools
import hashlib
import heapq
import html
import http.client
import http.server
import ipaddress
import json
import logging
import marshal
import math
import mmap
import os
import re
import resource
import secrets
import selectors
import shlex
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse

log = logging.getLogger("pipe2me.server")


# ---- BEGIN SHARED base (identical in pipe2me_server.py and pipe2me_pod.py) ----
# What every section of both programs stands on: the one exception tree and
# its exit codes, the services a tunnel may publish, peer text made safe for
# logs, the host-name check, files replaced atomically, the one wrapper
# through which openssl runs, times as the CLI prints them, and the one
# HTTP exchange both make with other hosts, bounded in all.

EXIT_INTERRUPTED = 130                # main() after Ctrl-C; the tree below carries 1 to 4
SERVICE_PROTOCOLS = ("http", "https", "imap", "imaps", "smtp", "smtps", "ssh", "tcp")
HOSTNAME_MAX_CHARS = 253
HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
LAN_NAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # names on a LAN may hold '_'
OPENSSL_TIMEOUT_S = 60


class Pipe2meError(Exception):
    """An expected failure: main() prints the message alone and returns
    exit_code. The server's API answers http_status (the class's, or one
    given to this raise) with {"error": message} plus the `details` keys."""
    exit_code = 1
    http_status = 500

    def __init__(self, message, http_status=None, **details):
        super().__init__(message)
        if http_status is not None:
            self.http_status = http_status
        self.details = details


class UsageError(Pipe2meError):
    """Bad arguments, configuration or setup: fix the call, not worth retrying as is."""
    exit_code = 2
    http_status = 400


class Unavailable(Pipe2meError):
    """Something needed cannot be reached or failed: worth retrying later."""
    exit_code = 3
    http_status = 503


class Rejected(Pipe2meError):
    """Refused (bad token, expired, unknown): not worth retrying."""
    exit_code = 4
    http_status = 403


class NotFound(Rejected):
    """What was asked for does not exist (an unknown tunnel, endpoint or file)."""
    http_status = 404


class Expired(Rejected):
    """The tunnel's lifetime is over."""
    http_status = 410


class CertRefused(Rejected):
    """A CSR the server will not sign; the message says why."""
    http_status = 400


class OpensslFailed(Unavailable):
    """openssl ran and exited non-zero; the message carries its last stderr line."""


# C0 and C1 controls, DEL and the Unicode line breaks, as \xNN / \uNNNN: text
# a peer sent (a reason, a name, a request line) cannot start a log line.
CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + list(range(127, 160))}
CONTROL_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text, limit=300):
    """Peer text (any object, as str) made safe for a log line, a header or a page: its
    first `limit` characters, ASCII, all else escaped (\\n, \\x1b, \\u2028)."""
    return str(text)[:limit].encode("unicode_escape").decode("ascii")


def is_hostname(name, underscores=False):
    """True for dot-separated LDH labels (1-63 characters, no hyphen at either end),
    HOSTNAME_MAX_CHARS at most; underscores=True also lets labels hold '_', as LAN
    names may. Only such names reach an openssl -subj, a file or a header."""
    label = LAN_NAME_LABEL if underscores else HOSTNAME_LABEL
    return (isinstance(name, str) and 0 < len(name) <= HOSTNAME_MAX_CHARS
            and all(label.fullmatch(part) for part in name.split(".")))


def write_atomic(path, data, mode=0o644, durable=True):
    """Replace `path` by `data` (bytes or str) with file mode `mode`, so that a
    crash leaves the old or the new content, whole. The temporary file is made
    0600, so a secret is never readable by others, not even for a moment.
    durable=False skips the fsyncs (for files rewritten often and worthless
    after a crash, on a router's flash). OSError leaves no temporary file."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, ".%s.%d.%s.tmp" % (
        os.path.basename(path), os.getpid(), os.urandom(4).hex()))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory):
    """Make a rename in `directory` durable; a file system that cannot fsync a
    directory is let be (the rename still happened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_openssl(args, input_bytes=None, cwd=None, merge_stderr=False):
    """Run `openssl ARGS...` (argv list, no shell) and return its stdout bytes.

    The only place either program runs openssl. stdin is `input_bytes` or
    empty (so a passphrase prompt can never hang); merge_stderr=True returns
    stderr interleaved with stdout, for the few commands that report only
    there. A missing openssl is a UsageError naming the package; a timeout
    (OPENSSL_TIMEOUT_S) or a failure to start it is Unavailable; a non-zero exit
    is OpensslFailed with openssl's last stderr line (where it puts the error)."""
    import subprocess  # here, not at the top: the pod's `start` never runs openssl (RSS)
    argv = ["openssl"] + [str(arg) for arg in args]
    stdin = {"input": input_bytes} if input_bytes is not None else {"stdin": subprocess.DEVNULL}
    try:
        done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, timeout=OPENSSL_TIMEOUT_S,
                              stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                              check=False, **stdin)
    except subprocess.TimeoutExpired:
        raise Unavailable("openssl %s did not finish within %s s" % (argv[1], OPENSSL_TIMEOUT_S)) from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename == "openssl":
            raise UsageError("the openssl command was not found: install the package "
                             "'openssl' (Debian/Ubuntu) or 'openssl-util' (OpenWrt)") from None
        raise Unavailable("cannot run openssl %s: %s" % (argv[1], exc)) from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).decode("utf-8", "replace").splitlines()
        last = next((line.strip()[:300] for line in reversed(lines) if line.strip()), "no message")
        raise OpensslFailed("openssl %s failed (exit %d): %s" % (argv[1], done.returncode, last))
    return done.stdout


def iso_time(epoch):
    """An epoch as 2026-12-02T05:10:00Z; "" for None."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else ""


def http_exchange(request, timeout_s, limit, handlers=(), context=None, redirects=True):
    """(status, headers, first `limit` bytes of the body) of the urllib `request`,
    error statuses included (a 3xx too, with redirects=False); socket.timeout
    once `timeout_s` has passed in all. urllib's timeout bounds each read, so
    a peer sending a byte a second would hold the caller for hours: at the
    deadline a timer shuts the socket."""
    import http.client
    import urllib.error
    import urllib.request
    opened, expired = [], threading.Event()

    def cut(connection):
        # urllib sets .sock to None once the head is read; the body comes on `kept`
        sock = connection.sock or getattr(connection, "kept", None)
        if expired.is_set() and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def expire():
        expired.set()
        for connection in list(opened):
            cut(connection)

    def bounded(base):
        """The http.client connection class `base`, its socket cut at the deadline."""
        class Connection(base):
            def connect(self):
                opened.append(self)
                super().connect()
                self.kept = self.sock
                cut(self)  # the deadline passed while it connected
        return Connection

    class Bounded(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
        """urllib's http: and https: handler, opening bounded connections."""
        def http_open(self, req):
            return self.do_open(bounded(http.client.HTTPConnection), req)

        def https_open(self, req):
            return self.do_open(bounded(http.client.HTTPSConnection), req, context=self._context)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        """A 3xx is the answer, not a new request."""
        def redirect_request(self, *args, **kwargs):
            return None

    handlers = tuple(handlers) + (() if redirects else (NoRedirect(),))
    opener = urllib.request.build_opener(Bounded(context=context), *handlers)
    timer = threading.Timer(timeout_s, expire)
    timer.start()
    try:
        try:
            response = opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            answer = response.getcode(), response.headers, response.read(limit)
    except (OSError, http.client.HTTPException):
        if not expired.is_set():
            raise
    finally:
        timer.cancel()
    if expired.is_set():
        raise socket.timeout("timed out after %g s" % timeout_s)
    return answer
# ---- END SHARED base ----


# =====================================================================
# SETTINGS — configuration keys and their validation; read by everything
# =====================================================================

PROXY_PROTOCOL_CHOICES = ("v1", "v2", "off")  # a tunnel's PROXY protocol header to its pod's services
DEFAULT_CONFIG_FILE = "~/pipe2me.server.conf"
SWEEP_INTERVAL_S = 1.0            # expiry, deadlines and traffic bookkeeping
PORT_RETRY_S = 60.0               # a public port another socket held is offered again after
TRAFFIC_SAVE_INTERVAL_S = 30.0    # how often live byte counters reach the store
API_MAX_BODY_BYTES = 64 * 1024
API_MAX_CONNECTIONS = 64
FRONT_SNIFF_BYTES = 16 * 1024     # request head / ClientHello limit on the fronts
BAD_TOKEN_LIMIT = 10              # failed token uses per address per window ...
BAD_TOKEN_WINDOW_S = 60.0         # ... before answering 429
BAD_TOKEN_GLOBAL_LIMIT = 100      # failed token uses from all addresses together per window
LOG_REPEAT_LIMIT = 20             # lines of one kind of refusal per window, then a summary
LOG_REPEAT_WINDOW_S = 60.0


def parse_domain(value):
    """The managed domain, lower-cased: a host name with a dot, or localhost."""
    value = value.strip().lower().rstrip(".")
    if not is_hostname(value) or "." not in value and value != "localhost":
        raise ValueError("not a domain name: %r" % value)
    return value


def parse_port(value):
    """A port number 0..65535 (0: any free port, for tests)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range: %s" % value)
    return port


def parse_optional_port(value):
    """A port, or None for an empty value (the listener is off)."""
    return parse_port(value) if value.strip() else None


def parse_port_range(value):
    """`a...b` excludes b, `a..b` includes it; returns range()."""
    match = re.fullmatch(r"\s*(\d+)\s*(\.\.\.?)\s*(\d+)\s*", value)
    if not match:
        raise ValueError("expected FIRST...END or FIRST..LAST, got %r" % value)
    first, last = int(match.group(1)), int(match.group(3))
    if match.group(2) == "...":
        last -= 1
    if not 1 <= first <= last <= 65535:
        raise ValueError("empty or out-of-range port range %r" % value)
    return range(first, last + 1)


def parse_address(value):
    """One IPv4 or IPv6 address, in its normal form."""
    return str(ipaddress.ip_address(value.strip()))


def parse_addresses(value):
    """A list of addresses separated by commas or spaces."""
    return [parse_address(v) for v in re.split(r"[\s,]+", value.strip()) if v]


def parse_path(value):
    """An absolute path (~ expanded), or "" for an empty value."""
    return os.path.abspath(os.path.expanduser(value)) if value.strip() else ""


def parse_required_path(value):
    """A path (parse_path) that must not be empty."""
    if not value.strip():
        raise ValueError("must not be empty (the default is ~/.pipe2me-server)")
    return parse_path(value)


def parse_duration(value):
    """Seconds, or a number with an s/m/h/d suffix."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
    if not match:
        raise ValueError("not a duration: %r" % value)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit


def parse_bytes(value):
    """A byte count, optionally with a K, M or G suffix (powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KMG]?)", value.strip().upper())
    if not match:
        raise ValueError("not a byte count: %r" % value)
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def at_least(parse, minimum, why):
    """The parser `parse`, refusing a result below `minimum` with `why`."""
    def parse_at_least(value):
        result = parse(value)
        if result < minimum:
            raise ValueError(why)
        return result
    return parse_at_least


parse_positive_duration = at_least(parse_duration, 1, "must be more than 0 seconds")
parse_count = at_least(int, 0, "must not be negative")          # a whole number
parse_budget = at_least(parse_bytes, 1 << 20, "at least 1M")    # a byte count


def parse_networks(value):
    """Comma-separated addresses or networks (CIDR); empty = none."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in value.split(",") if part.strip())


def parse_bool(value):
    """true/yes/1/on or false/no/0/off."""
    word = value.strip().lower()
    if word not in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        raise ValueError("not a boolean: %r" % value.strip())
    return word in ("true", "yes", "1", "on")


def parse_dns_service(value):
    """Empty, 'builtin' or 'dnsimple:TOKEN[:ACCOUNT]', as given."""
    value = value.strip()
    if not re.fullmatch(r"(builtin|dnsimple:[^:]+(:[^:]*)?)?", value):
        raise ValueError("expected empty, 'builtin' or 'dnsimple:TOKEN[:ACCOUNT]'")
    return value


def parse_https_url(value):
    """An https:// URL, or empty."""
    value = value.strip()
    parts = urllib.parse.urlsplit(value)
    if value and (parts.scheme != "https" or not parts.hostname):
        raise ValueError("expected an https:// URL or empty")
    return value


def parse_email(value):
    """An e-mail address, or empty."""
    value = value.strip()
    if value and not re.fullmatch(r"[^@\s:,<>]+@[A-Za-z0-9.-]+", value):
        raise ValueError("not an e-mail address: %r" % value[:80])
    return value


def parse_acme_challenge(value):
    """dns-01, http-01 or empty (choose by the DNS setup)."""
    value = value.strip().lower()
    if value not in ("", "dns-01", "http-01"):
        raise ValueError("expected dns-01, http-01 or empty")
    return value


# key: (default, parser, one-line description for check-config and the example)
CONFIG_KEYS = {
    "TUNNEL_DOMAIN": ("pipe2.localhost", parse_domain, "the managed domain"),
    "TUNNEL_PORTS": ("10000...15000", parse_port_range, "public port range"),
    "DYNAMIC_DNS_SERVICE": ("", parse_dns_service, "dnsimple:TOKEN[:ACCOUNT], builtin, or empty"),
    "DNSIMPLE_API_URL": ("https://api.dnsimple.com", lambda v: v.strip().rstrip("/"), "dnsimple API base URL"),
    "STATE_DIR": ("~/.pipe2me-server", parse_required_path, "where all server state lives"),
    "LISTEN_ADDRESS": ("0.0.0.0", parse_address, "address all listeners bind"),
    "PUBLIC_ADDRESS": ("", parse_addresses, "the server's public IPv4 and/or IPv6"),
    "HTTP_PORT": ("8080", parse_port, "HTTP front and API"),
    "HTTPS_PORT": ("8443", parse_port, "HTTPS front (SNI passthrough) and API over TLS"),
    "TUNNEL_PORT": ("8444", parse_port, "where pods connect"),
    "DNS_PORT": ("", parse_optional_port, "built-in DNS responder port; empty = off"),
    "DNS_RATE_LIMIT": ("100", parse_count, "UDP DNS answers per second to one IPv4 /24 or IPv6 /56; 0 = no limit"),
    "DNS_RATE_SLIP": ("2", parse_count, "past DNS_RATE_LIMIT every Nth query gets a truncated answer (retry over TCP), the rest none; 0 = none"),
    "DNS_CLIENT_SUBNET_FROM": ("", parse_networks, "resolvers (addresses or networks) whose EDNS client-subnet option is honoured; empty = none"),
    "TOKENS_FILE": ("", parse_path, "auth tokens; default $STATE_DIR/tokens.conf"),
    "CA_CERT": ("", parse_path, "operator-supplied intermediate CA certificate (+ chain)"),
    "CA_KEY": ("", parse_path, "its private key"),
    "HEARTBEAT_INTERVAL": ("10", parse_positive_duration, "seconds between pings; 3x silent = dead"),
    "PORT_GRACE": ("1h", parse_duration, "how long an expired tunnel keeps its ports and name"),
    "SHUTDOWN_GRACE": ("10", parse_duration, "how long SIGTERM lets running streams finish"),
    "HELLO_TIMEOUT": ("10", parse_positive_duration, "seconds a pod connection has for its TLS handshake and HELLO"),
    "MAX_STREAMS_PER_TUNNEL": ("10000", parse_count, "open streams per tunnel; 0 = no cap"),
    "MAX_TUNNELS_PER_TOKEN": ("10", parse_count, "live tunnels per token; 0 = no cap"),
    "MAX_CERTS_PER_HOUR": ("6", parse_count, "certificates signed per tunnel per hour "
                           "(that many at once, then evenly); 0 = no cap"),
    "STREAM_IDLE_TIMEOUT": ("0", parse_duration, "close streams idle this long; 0 = never"),
    "MAX_PENDING_FRONT": ("1000", parse_count, "connections on each front still sending their first head; 0 = no cap"),
    "MAX_PENDING_FRONT_PER_SOURCE": ("32", parse_count, "of those, per source (IPv4 address, IPv6 /64); 0 = no cap"),
    "TRUSTED_PROXIES": ("", parse_networks, "proxies in front of the HTTP front whose X-Forwarded-*/Forwarded are kept (CIDRs)"),
    "MAX_PENDING_HANDSHAKES": ("64", parse_count, "pod connections still authenticating; 0 = no cap"),
    "MAX_PENDING_HANDSHAKES_PER_SOURCE": ("16", parse_count, "of those, per IPv4 address or IPv6 /64; 0 = no limit"),
    "API_CONNECTIONS_PER_SOURCE": ("8", parse_count, "API requests served at once per IPv4 address or IPv6 /64; 0 = no limit"),
    "FRONT_HEAD_DEADLINE": ("10", parse_positive_duration, "seconds a front connection may take to send its head"),
    "API_REQUEST_DEADLINE": ("20", parse_positive_duration, "seconds an API connection may last (against slowloris)"),
    "ACME_DIRECTORY": ("", parse_https_url, "ACME directory URL for publicly trusted certificates; empty = off"),
    "ACME_EMAIL": ("", parse_email, "contact address of the ACME account"),
    "ACME_CA_BUNDLE": ("", parse_path, "CA certificates trusted for the ACME server's HTTPS; empty = system store"),
    "ACME_CHALLENGE": ("", parse_acme_challenge, "dns-01 or http-01; empty = dns-01 when the server manages DNS"),
    "ACME_RETRY": ("60", parse_positive_duration, "first retry after the ACME CA refused; doubles up to 6h"),
    "ACME_NEW_CERTS_PER_WEEK": ("50", parse_count, "new ACME certificates per 7 days before orders queue; 0 = no cap"),
    "ACME_NEW_CERTS_PER_TOKEN_PER_WEEK": ("10", parse_count, "of those, per token (the tunnels it made); "
                                          "past it only its orders queue; 0 = no share"),
    "METRICS_ALLOW": ("127.0.0.1,::1", parse_networks, "clients whose /metrics and / name tenants (addresses or CIDR); others see totals"),
    "METRICS_TOKEN": ("", str.strip, "a bearer token that also shows tenant names (Authorization: Bearer ...); empty = none"),
    "MAX_BUFFERED_BYTES": ("256M", parse_budget, "bytes the relay holds for all readers that lag; past it, it stops reading their sources"),
    "MAX_BUFFERED_BYTES_PER_TUNNEL": ("32M", parse_budget, "the same budget for the streams of one tunnel"),
    "BUFFER_STALL": ("5", parse_positive_duration, "seconds a reader may take nothing while a buffer budget is used up "
                     "before its stream is reset"),
    "METRICS_PER_TUNNEL": ("yes", parse_bool, "/metrics has two series per tunnel; no = totals only"),
}


class Settings:
    """Validated configuration: one attribute per key, lower-cased."""

    def __init__(self, values, origins):
        self.origins = origins  # key -> "file:line", "environment" or "default"
        for key, value in values.items():
            setattr(self, key.lower(), value)
        if not self.tokens_file:
            self.tokens_file = os.path.join(self.state_dir, "tokens.conf")

    @property
    def tunnel_dir(self):
        """STATE_DIR/tunnels: one JSON file per tunnel."""
        return os.path.join(self.state_dir, "tunnels")


def read_config_file(path):
    """Return {KEY: (raw value, "file:line")} from KEY=value lines."""
    entries = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read config %s: %s" % (path, exc)) from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = "%s:%d" % (path, number)
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError("%s: expected KEY=value" % where)
        if key not in CONFIG_KEYS:
            raise UsageError("%s: unknown key %s" % (where, key))
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # one pair of matching quotes
        entries[key] = (value, where)
    return entries


def load_settings(config_path=None, flags=None, environ=None):
    """Defaults < config file < environment < flags; raises UsageError naming the source."""
    environ = os.environ if environ is None else environ
    path = config_path or os.path.expanduser(DEFAULT_CONFIG_FILE)
    if config_path and not os.path.exists(config_path):
        raise UsageError("config file %s does not exist" % config_path)
    raw = {key: (default, "default") for key, (default, _, _) in CONFIG_KEYS.items()}
    if os.path.exists(path):
        raw.update(read_config_file(path))
    raw.update({k: (environ[k], "environment %s" % k) for k in CONFIG_KEYS if k in environ})
    raw.update({k: (v, "flag --%s" % k.lower().replace("_", "-"))
                for k, v in (flags or {}).items() if v is not None})
    values = {}
    for key, (value, origin) in raw.items():
        try:
            values[key] = CONFIG_KEYS[key][1](value)
        except ValueError as exc:
            raise UsageError("%s: bad %s: %s" % (origin, key, exc)) from None
    return Settings(values, {k: o for k, (_, o) in raw.items()})


# =====================================================================
# HELPERS — JSON files, shell format, addresses and their per-source prefix,
# name words, bound sockets
# =====================================================================

def write_json(path, obj, mode=0o644):
    """Write obj as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", mode)


def read_json(path):
    """The JSON object in path (OSError and ValueError pass through)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def shown_value(value):
    """A value as the configuration, tokens.conf and the shell format spell it:
    nothing as empty, true/false, a range as a..b, a list comma-separated."""
    if value is None:
        return ""
    if isinstance(value, range):
        return "%d..%d" % (value[0], value[-1])
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def shell_format(obj, prefix=""):
    """key=value lines (shell-quoted); lists become key_0, key_1, ..."""
    lines = []
    for key, value in obj.items():
        if isinstance(value, (list, tuple)):
            lines += ["%s%s_%d=%s" % (prefix, key, i, shlex.quote(str(v)))
                      for i, v in enumerate(value)]
        elif not isinstance(value, dict):
            lines.append("%s%s=%s" % (prefix, key, shlex.quote(shown_value(value))))
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=4096)
def source_prefix(address, ipv4_bits, ipv6_bits):
    """The network a per-source limit counts `address` (a string) in: its
    IPv4 /ipv4_bits or IPv6 /ipv6_bits, an IPv4-mapped address as IPv4."""
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    bits = ipv4_bits if ip.version == 4 else ipv6_bits
    return str(ipaddress.ip_network((ip, bits), strict=False))


class SourceShares:
    """Connections served by threads (pod handshakes, API requests): `cap` at
    once, `share` per source (0 = no limit). A newcomer whose source holds its
    share is refused or, with `rotate_after_s`, displaces that source's oldest
    connection once it has waited so long: a pod behind an attacker's NAT still
    gets in, while quick handshakes of many pods behind one NAT after a restart
    do not cut each other off (API requests would: they do not rotate). When
    every slot is taken, a source holding fewer than the largest holder
    displaces that holder's oldest, so a flood from one source or many leaves
    room for everybody else. A displaced connection is shut down, which ends
    its thread. Thread-safe."""

    def __init__(self, cap, share, rotate_after_s=None):
        self.cap, self.share, self.rotate_after_s = cap, share, rotate_after_s
        self.lock = threading.Lock()
        self.holders = {}                     # socket -> (source, taken at)
        self.counts = collections.Counter()   # source -> slots held

    def take(self, sock, source, displace=True):
        """Whether `sock` may be served (without `displace`: only in a free
        slot); the owner calls leave() before closing it."""
        with self.lock:
            held = self.counts[source]
            victim = None
            now = time.monotonic()
            if self.share and held >= self.share:
                if self.rotate_after_s is None or not displace:
                    return False
                victim = self.oldest(source)
                if now - self.holders[victim][1] < self.rotate_after_s:
                    return False
            elif self.cap and len(self.holders) >= self.cap:
                victim = self.victim(held) if displace else None
                if victim is None:
                    return False
            if victim is not None:
                self.forget(victim)
            self.holders[sock] = (source, now)
            self.counts[source] += 1
        if victim is not None:  # its thread sees EOF and ends; closing is its owner's job
            with contextlib.suppress(OSError):
                socket.socket.shutdown(victim, socket.SHUT_RDWR)
        return True

    def victim(self, held):
        """The oldest connection of the largest holder, if that holds more than `held`."""
        top = max(self.counts.values())
        if top <= held:
            return None
        return self.oldest(min((s for s, n in self.counts.items() if n == top),
                               key=lambda s: self.holders[self.oldest(s)][1]))

    def oldest(self, source):
        """The socket that `source` has held longest."""
        return min((sock for sock, (owner, _) in self.holders.items() if owner == source),
                   key=lambda sock: self.holders[sock][1])

    def rekey(self, old, new):
        """The connection is now served through `new` (a TLS socket wrapping `old`)."""
        with self.lock:
            if old in self.holders:
                self.holders[new] = self.holders.pop(old)

    def leave(self, sock):
        """`sock` gives its slot back (True if it held one); thread-safe."""
        with self.lock:
            return self.forget(sock)

    def forget(self, sock):
        """Drop `sock` from the counts (the caller holds the lock); True if it held a slot."""
        entry = self.holders.pop(sock, None)
        if entry is not None:
            self.counts[entry[0]] -= 1
            if not self.counts[entry[0]]:
                del self.counts[entry[0]]
        return entry is not None


def mask_secret(secret):
    """A secret shortened for logs and listings: its first four characters."""
    return secret[:4] + "…" if len(secret) > 8 else "…"


def sha256_hex(data):
    """The hex SHA-256 of bytes, or of a str's UTF-8 encoding."""
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode()).hexdigest()


def bind_listener(address, port, kind=socket.SOCK_STREAM, listen=True):
    """A bound socket, listening if TCP and `listen`; Unavailable naming a taken port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM and listen:
            sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise Unavailable("cannot listen on %s port %d: %s" % (address, port, exc.strerror)) from None
    return sock


def port_can_listen(address, port):
    """Whether a public listener could bind (address, port) right now."""
    try:
        bind_listener(address, port, listen=False).close()
    except Unavailable:
        return False
    return True


class PendingBudget:
    """The connections of one front still sending their first head or ClientHello:
    at most `cap` (0 = no cap), `share` per source (an IPv4 address, an IPv6 /64),
    so one source flooding a front leaves room to everybody else."""

    def __init__(self, name, cap, share):
        self.name, self.cap, self.share = name, cap, share
        self.total = 0
        self.by_source = collections.Counter()

    def take(self, address):
        """The source key if the connection fits, else None (logged)."""
        key = source_prefix(address[0], 32, 64)
        if self.cap and self.total >= self.cap:
            why, cap = "pending cap reached", self.cap
        elif self.share and self.by_source[key] >= self.share:
            why, cap = "pending share of one source reached", self.share
        else:
            self.total += 1
            self.by_source[key] += 1
            return key
        log.warning("%s, consumer closed front=%s from=%s cap=%d", why, self.name,
                    shown_address(address), cap)
        return None

    def give_back(self, key):
        """A connection left the budget (routed, closed or given up)."""
        self.total -= 1
        self.by_source[key] -= 1
        if not self.by_source[key]:
            del self.by_source[key]


def shown_address(address):
    """host:port of a peer for a log line ([v6]:port)."""
    host = address[0]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, address[1])


MOODS = """able agile amber balmy blithe bold brave breezy bright calm candid cheery
chill civil clever cosmic cozy crisp curious daring dapper deft eager earnest easy
epic fair fancy fearless fierce fond frank free fresh gentle giddy glad gleeful
golden grand happy hardy hearty honest humble jolly jovial keen kind lively
loyal lucky lunar merry mighty mellow modest neat nimble noble peppy perky placid
plucky polite proud quick quiet quirky radiant rapid ready regal robust rosy
serene sharp shiny sincere smart snappy snug sober solar spry steady sturdy sunny
swift tender tidy tranquil trusty upbeat valiant vivid warm wise witty zany zesty""".split()
COLORS = """amber azure beige black blue bronze brown cerise cobalt copper coral cream
crimson cyan denim ebony emerald fawn fuchsia garnet gold gray green hazel indigo
ivory jade khaki lava lemon lilac lime magenta maroon mauve mint navy ochre olive
onyx orange orchid peach pearl pink plum purple red rose ruby rust saffron sage
salmon sand scarlet sepia sienna silver slate tan teal topaz umber violet white
wine yellow""".split()
ANIMALS = """alpaca badger beaver bison bobcat camel caribou cheetah cobra condor cougar
coyote crane dingo dolphin donkey eagle falcon ferret finch gazelle gecko gibbon
giraffe goose gopher heron hippo hyena ibex iguana jackal jaguar koala lemur
leopard lizard llama lynx marmot marten mink moose narwhal newt ocelot octopus
orca otter owl panda panther parrot pelican penguin puffin puma quail rabbit
raccoon raven salmon seal shark sloth stork swan tapir tiger toucan turtle
unicorn viper walrus weasel whale wolf wombat yak zebra""".split()


def plain_address(address):
    """The address as a string, an IPv4-mapped IPv6 address as its IPv4."""
    ip = ipaddress.ip_address(address)
    return str(getattr(ip, "ipv4_mapped", None) or ip)

# ---- BEGIN SHARED protocol (identical in pipe2me_server.py and pipe2me_pod.py) ----
# The tunnel connection: the pod dials TUNNEL_PORT, both sides authenticate with
# TLS certificates of the server's CA, then speak frames until either side closes.
#
#   frame  = type (u8) | stream id (u32) | payload length (u32) | payload
#
# Stream 0 is the connection itself; streams 1, 2, ... are consumer connections,
# numbered by the server in increasing order and never reused on one connection.
# The pod's first frame is HELLO; the server answers WELCOME or REJECT. After
# that each side may send the frames listed in POD_SENDS / SERVER_SENDS.
# Flow control is per stream and per direction, as in SSH channels: a side may
# have at most STREAM_WINDOW_BYTES of DATA unacknowledged; the receiver returns
# credit with WINDOW frames once it has handed the bytes to the local socket.

PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct("!BII")
MAX_FRAME_BYTES = 256 * 1024          # largest payload a peer may send
STREAM_WINDOW_BYTES = 4 * 1024 * 1024  # per stream and direction: 100 MB/s at 40 ms
HELLO_TIMEOUT_S = 10                  # the pod's wait for WELCOME (the server's: HELLO_TIMEOUT)
HEARTBEAT_INTERVAL_S = 10             # PING when idle; silent for 3x = dead


class Msg(enum.IntEnum):
    """Frame types. Payloads: JSON objects for control frames on stream 0."""
    HELLO = 1    # pod: {"kind": "control", "version", "tunnel", "features", "yield"} — first
                 # frame; "yield": true (a pod that was replaced) takes no live session over
    WELCOME = 2  # server: {"tunnel", "fqdn", "services", "heartbeat_interval_s", "proxy_protocol",
                 # "http_port", "https_port"}
    REJECT = 3   # server: {"reason", "permanent", "replaced_by"}; the connection then closes
    OPEN = 4     # server: a consumer arrived; payload u16 public port, then
                 # (for a pod whose HELLO lists "consumer_address") the
                 # consumer's and the public end's address, see encode_open()
    DATA = 5     # both: stream bytes, at most the peer's remaining credit
    WINDOW = 6   # both: payload u32 credit returned for this stream
    EOF = 7      # both: the sender will send no more DATA on this stream
    RESET = 8    # both: the stream is aborted; payload utf-8 reason (see below)
    PING = 9     # both: payload echoed back in PONG
    PONG = 10    # both
    GOAWAY = 11  # both: {"reason", "replaced_by", "permanent"}; no new streams, running ones
                 # may finish; "permanent" (tunnel deleted or expired): do not reconnect
    CERT = 12    # server: {"state", "reason", "next_try_at", "not_after", "chain"?}: the
    #              tunnel's publicly trusted (ACME) certificate and why it is (not) there;
    #              sent only to a pod whose HELLO lists FEATURE_CERT, after WELCOME and
    #              on every change


POD_SENDS = frozenset({Msg.HELLO, Msg.DATA, Msg.WINDOW, Msg.EOF, Msg.RESET,
                       Msg.PING, Msg.PONG, Msg.GOAWAY})
SERVER_SENDS = frozenset({Msg.WELCOME, Msg.REJECT, Msg.OPEN, Msg.DATA,
                          Msg.WINDOW, Msg.EOF, Msg.RESET, Msg.PING, Msg.PONG,
                          Msg.GOAWAY, Msg.CERT})
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
# Optional additions a side announces (HELLO "features"); a peer that does not
# list one never receives it, so pods and servers of protocol 1 without it
# keep working with those that have it.
FEATURE_CONSUMER_ADDRESS = "consumer_address"   # OPEN carries the addresses
FEATURE_CERT = "cert"                           # the pod takes CERT frames
POD_FEATURES = (FEATURE_CONSUMER_ADDRESS, FEATURE_CERT)
OPEN_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}


def encode_open(port, consumer=None, public=None):
    """OPEN's payload: u16 public port; with both addresses ((ip, port) of the
    consumer and of the public end it reached) also u8 IP version (4 or 6),
    consumer address, u16 consumer port, public address, u16 public port."""
    payload = U16.pack(port)
    if consumer is None or public is None:
        return payload
    version = 6 if ":" in consumer[0] else 4
    family = OPEN_FAMILIES[version][0]
    return payload + bytes([version]) + b"".join(
        socket.inet_pton(family, ip) + U16.pack(number) for ip, number in (consumer, public))


def decode_open(payload):
    """(public port, consumer (ip, port) or None, public end (ip, port) or None)."""
    if len(payload) == U16.size:
        return U16.unpack(payload)[0], None, None
    family, size = OPEN_FAMILIES.get(payload[2] if len(payload) > 2 else 0, (None, 0))
    if family is None or len(payload) != 3 + 2 * (size + U16.size):
        raise ProtocolError("bad OPEN payload of %d bytes" % len(payload))
    consumer, public = [(socket.inet_ntop(family, bytes(payload[start:start + size])),
                         U16.unpack_from(payload, start + size)[0])
                        for start in (3, 3 + size + U16.size)]
    return U16.unpack_from(payload)[0], consumer, public
# A pod's RESET reason for a local service it cannot reach starts with one of
# these; the server's HTTP front answers 504 for the first, 503 for the other
# (text from older pods: 504 if it says "timed out", else 503).
RESET_CONNECT_TIMED_OUT = "local connect timed out"
RESET_CONNECT_FAILED = "local connect failed"


class ProtocolError(Rejected):
    """The peer broke the wire contract; the connection is closed with this reason."""


def encode_frame(msg, stream, payload=b""):
    """Return the bytes of one frame. Payload must not exceed MAX_FRAME_BYTES."""
    return FRAME_HEADER.pack(msg, stream, len(payload)) + payload


def encode_control(msg, obj):
    """Return a stream-0 frame whose payload is the JSON encoding of obj."""
    return encode_frame(msg, 0, json.dumps(obj, separators=(",", ":")).encode())


def decode_control(payload):
    """Return the JSON object of a control frame, or raise ProtocolError."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("control frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj


class FrameDecoder:
    """Splits a byte stream into frames. DATA payloads pass on as they arrive
    (cut-through), maybe in pieces, as memoryviews valid only until the next call;
    other frames come whole, as bytes. At most one control frame is buffered; an
    unknown type or an oversized frame is a ProtocolError, nothing else raises."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.buffer = bytearray()   # the header or control frame being assembled
        self.header = None          # (msg, stream, length) once a header is whole
        self.data_stream = 0        # DATA payload in progress: its stream ...
        self.data_left = 0          # ... and how much of it is still to come

    def frames(self, data):
        """Yield (msg, stream, payload) for each frame (or DATA piece) `data` completes."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self.data_left:
                piece = view[pos:pos + self.data_left]
                self.data_left -= len(piece)
                pos += len(piece)
                yield Msg.DATA, self.data_stream, piece
                continue
            want = FRAME_HEADER.size + (self.header[2] if self.header else 0)
            take = min(want - len(self.buffer), end - pos)
            self.buffer += view[pos:pos + take]
            pos += take
            if len(self.buffer) < want:
                return
            if self.header is None:
                frame = self.start_frame()
                if frame is not None:
                    yield frame
            else:
                yield self.finish_frame()

    def start_frame(self):
        """A header is whole: check it; DATA switches to cut-through."""
        msg, stream, length = FRAME_HEADER.unpack_from(self.buffer)
        if msg not in self.allowed:
            raise ProtocolError("unexpected frame type %d" % msg)
        if length > MAX_FRAME_BYTES:
            raise ProtocolError("frame of %d bytes exceeds the limit" % length)
        if msg == Msg.DATA and length:
            del self.buffer[:]
            self.data_stream, self.data_left = stream, length
            return None
        self.header = (msg, stream, length)
        return self.finish_frame() if not length else None

    def finish_frame(self):
        """The whole non-DATA frame in the buffer; the buffer is emptied."""
        msg, stream, _length = self.header
        payload = bytes(self.buffer[FRAME_HEADER.size:])
        del self.buffer[:]
        self.header = None
        return Msg(msg), stream, payload


def read_frame_blocking(sock, allowed, deadline):
    """Read exactly one whole frame from a blocking socket (the greeting), so
    nothing after it is consumed. ProtocolError on EOF, bad frames or after
    `deadline` (time.monotonic())."""
    header = recv_exactly(sock, FRAME_HEADER.size, deadline)
    msg, stream, length = FRAME_HEADER.unpack(header)
    if msg not in allowed or length > MAX_FRAME_BYTES:
        raise ProtocolError("bad first frame (type %d, %d bytes)" % (msg, length))
    return Msg(msg), stream, recv_exactly(sock, length, deadline)


def recv_exactly(sock, size, deadline):
    """Exactly `size` bytes from a blocking socket before `deadline`, or ProtocolError."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("greeting not complete before its deadline")
        sock.settimeout(remaining)  # the deadline bounds the whole greeting, not each read
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError("connection closed during the greeting")
        data += chunk
    return bytes(data)
# ---- END SHARED protocol ----
# ---- BEGIN SHARED relay (identical in pipe2me_server.py and pipe2me_pod.py) ----
# One thread, one selector. A Mux owns one tunnel connection (TLS, non-blocking)
# and the Streams carried over it; each Stream pairs a local TCP socket (the
# consumer on the server, the service on the pod) with a stream id.
#
# Backpressure: a Stream reads its socket only while it has credit from the
# peer and the Mux's send buffer is below MUX_HIGH_WATER_BYTES; bytes from the
# peer wait in the Stream's buffer, which the peer's window bounds. So memory
# per stream never exceeds STREAM_WINDOW_BYTES, and a consumer that stops
# reading stalls only its own stream.
#
# Half-close: local EOF -> EOF frame; EOF frame -> drain, then shutdown(SHUT_WR).
# A Stream is finished when both directions are closed; RESET aborts it.

READ_CHUNK_BYTES = 256 * 1024          # one local read becomes one DATA frame
TLS_READ_BYTES = 256 * 1024            # decoded per batch; a TLS read returns one 16 KiB record
WRITE_CHUNK_BYTES = FRAME_HEADER.size + READ_CHUNK_BYTES  # >= any direct write, for TLS retries
MUX_HIGH_WATER_BYTES = 1024 * 1024
MUX_LOW_WATER_BYTES = 256 * 1024
MAX_BUFFERED_BYTES = 64 * 1024 * 1024   # default budget of a loop (and of one Mux) for peer bytes
CONTROL_REPLY_LIMIT_BYTES = MUX_HIGH_WATER_BYTES  # a PONG is dropped while more waits unsent
MUX_FRAMES_PER_TURN = 4096            # then other connections get their turn
BUFFER_STALL_S = 5.0                   # under pressure, a stream that wrote nothing this long is reset
WINDOW_UPDATE_BYTES = STREAM_WINDOW_BYTES // 4
LOCAL_CONNECT_TIMEOUT_S = 10           # a local service that has not accepted by then is given up
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
SOCKET_GONE = (ConnectionError, TimeoutError, OSError)


class EventLoop:
    """A selectors loop with timers and a thread-safe call_soon; callbacks must not
    block. With a `log`, an exception from a callback ends only the connection it
    belongs to (contain()); without one it propagates out of run(). `buffered` counts
    the bytes that wait in this loop's Streams for their local socket; past
    `buffer_budget` the Muxes that produce them stop reading (Mux.note_buffered)."""

    def __init__(self, log=None, buffer_budget=MAX_BUFFERED_BYTES, stall_s=BUFFER_STALL_S):
        self.log = log
        printable("")  # loads its codec now: out of descriptors, contain() can still log
        self.crashes = 0          # callbacks that raised, for the metrics
        self.buffered = 0
        self.buffer_budget = buffer_budget
        self.stall_s = stall_s
        self.pressed = set()      # Muxes holding their reads back for the budget
        self.holders = set()      # Muxes with bytes in `buffered`
        self.pressure_timer = None
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self.timer_seq = 0
        self.soon = collections.deque()
        self.interest = {}  # socket -> (events, callback) as registered
        self.waker_r, self.waker_w = socket.socketpair()
        self.waker_r.setblocking(False)
        self.waker_w.setblocking(False)
        self.watch(self.waker_r, EVENT_READ, self.on_wake)
        self.running = False
        # Every Mux of this loop builds outgoing DATA in `scratch` and decodes
        # incoming bytes in `inbox`. They are shared because one thread runs
        # them all and no callback reads a Mux while another decodes: 512 KiB
        # per loop instead of per pod connection (and no heap churn per flap).
        # Anonymous maps: a page costs memory only once written, where
        # bytearray(n) writes all n bytes (an idle pod stays 0.5 MB smaller).
        self.scratch = mmap.mmap(-1, WRITE_CHUNK_BYTES)
        self.scratch_view = memoryview(self.scratch)
        self.inbox = mmap.mmap(-1, TLS_READ_BYTES)
        self.inbox_view = memoryview(self.inbox)

    def watch(self, sock, events, callback=None):
        """Register, change or (events=0) unregister `sock`; callback(mask) runs when it
        is ready. Called on every change of interest: a system call only when the events
        or the callback really change (bound methods compare equal)."""
        current = self.interest.get(sock)
        if current is None:
            if events:
                self.selector.register(sock, events, callback)
                self.interest[sock] = (events, callback)
        elif not events:
            self.selector.unregister(sock)
            del self.interest[sock]
        elif current != (events, callback):
            self.selector.modify(sock, events, callback)
            self.interest[sock] = (events, callback)

    def call_later(self, delay_s, callback):
        """Run callback after delay_s; returns a handle whose cancel() stops it."""
        handle = Timer(time.monotonic() + delay_s, callback)
        self.timer_seq += 1
        heapq.heappush(self.timers, (handle.when, self.timer_seq, handle))
        return handle

    def call_soon_threadsafe(self, callback):
        """From any thread: run callback in the loop thread soon."""
        self.soon.append(callback)
        try:
            self.waker_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def on_wake(self, _mask):
        """Drain the waker socket; the callbacks run after the select."""
        try:
            self.waker_r.recv(4096)
        except (BlockingIOError, OSError):
            pass

    def run(self):
        """Serve until stop()."""
        self.running = True
        while self.running:
            self.run_once()

    def run_once(self):
        """One select, then the due callbacks: sockets, call_soon, timers."""
        timeout = None
        if self.soon:
            timeout = 0
        elif self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        interest = self.interest
        for key, mask in self.selector.select(timeout):
            # An earlier callback of this batch may have closed or re-watched
            # the socket: deliver only what is still asked for, to its callback.
            current = interest.get(key.fileobj)
            if current is not None and mask & current[0]:
                try:
                    current[1](mask & current[0])
                except Exception as exc:  # noqa: BLE001 - the per-connection boundary
                    self.contain(current[1], exc)
        while self.soon:
            callback = self.soon.popleft()
            try:
                callback()
            except Exception as exc:  # noqa: BLE001
                self.contain(callback, exc)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            handle = heapq.heappop(self.timers)[2]
            if not handle.cancelled:
                try:
                    handle.callback()
                except Exception as exc:  # noqa: BLE001
                    self.contain(handle.callback, exc)

    def contain(self, callback, exc, crash=None):
        """A callback raised: a bug, or input nobody foresaw. As socketserver does, end
        only the connection it belongs to (`crash`, by default its owner's crash()), log
        one line (the traceback at debug level), count it and serve on. Never raises,
        also in a process out of descriptors."""
        if self.log is None:
            raise exc
        self.crashes += 1
        owner = getattr(callback, "__self__", None)
        self.log.warning("internal error contained in=%s error=%s",
                         type(owner or callback).__name__,
                         printable("%s: %s" % (type(exc).__name__, exc)))
        try:  # here: the pod on a router pays for the module only after a bug
            import traceback
            self.log.debug("%s", "".join(traceback.format_exception(type(exc), exc,
                                                                    exc.__traceback__)))
        except Exception:  # noqa: BLE001 - no descriptor left for the import: no traceback
            pass
        crash = crash or getattr(owner, "crash", None)
        if crash is not None:
            try:
                crash(exc)
            except Exception as second:  # noqa: BLE001 - closing must not stop the loop
                self.log.debug("cleanup after an internal error failed: %s", printable(str(second)))

    def stop(self):
        """End run() after the current iteration; callable from any thread."""
        self.running = False
        self.call_soon_threadsafe(lambda: None)

    # -- the buffer budget ------------------------------------------------
    def press(self, mux):
        """`mux` holds its reads back; meanwhile stalled readers are reaped once a second."""
        self.pressed.add(mux)
        if self.pressure_timer is None:
            self.pressure_timer = self.call_later(1.0, self.on_pressure_tick)

    def relieve(self):
        """Let the held Muxes read again once they and the loop are below half budget."""
        if self.buffered <= self.buffer_budget // 2:
            for mux in [m for m in self.pressed if m.buffered <= m.buffer_budget // 2]:
                mux.release()

    def on_pressure_tick(self):
        """Once a second while the budget is reached: reap stalled readers, relieve."""
        self.pressure_timer = None
        if not self.pressed:
            return
        now = time.monotonic()
        for mux in list(self.holders):
            mux.reap_stalled(now, self.stall_s)
        self.relieve()
        if self.pressed:
            self.pressure_timer = self.call_later(1.0, self.on_pressure_tick)


class Timer:
    """Handle of a call_later() callback."""

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        """Drop the callback now: what it refers to is released at once, not when due."""
        self.cancelled = True
        self.callback = None


class Stream:
    """One consumer connection carried over a Mux: its socket is read only with credit
    and an uncongested Mux, and at most STREAM_WINDOW_BYTES wait in `pending`."""

    __slots__ = ("mux", "id", "sock", "connecting", "credit", "unacked", "delivered", "pending",
                 "pending_bytes", "read_closed", "peer_eof", "write_closed", "last_active",
                 "paused", "drained_at", "closed", "target", "uncredited", "reset_reason")

    def __init__(self, mux, stream_id, sock, connecting=False):
        self.mux, self.id, self.sock = mux, stream_id, sock
        self.connecting = connecting
        self.credit = STREAM_WINDOW_BYTES      # what we may still send
        self.unacked = 0                       # received, not yet credited back
        self.delivered = 0                     # written locally since last WINDOW
        self.pending = collections.deque()     # bytes from the peer to write
        self.pending_bytes = 0
        self.read_closed = False               # local EOF seen, EOF frame sent
        self.peer_eof = False                  # EOF frame received
        self.write_closed = False              # SHUT_WR done on the socket
        self.last_active = time.monotonic()
        self.paused = False                    # reading held back by a rate cap
        self.drained_at = 0.0                  # last time the local socket took pending bytes
        self.closed = False
        self.target = ""                       # the local end, named in log lines
        self.uncredited = 0                    # own bytes in `pending`, not the peer's
        self.reset_reason = None               # the peer's RESET text, once it came
        if connecting:
            mux.loop.call_later(mux.connect_timeout_s, self.on_connect_timeout)
        self.update_interest()

    def update_interest(self):
        """Watch the socket for what the stream can do now: write what waits, read with credit."""
        if self.closed:
            return
        events = 0
        if self.connecting or self.pending:
            events |= EVENT_WRITE
        if not self.connecting and not self.read_closed and self.credit > 0 and not self.paused:
            if self.mux.congested:
                self.mux.blocked.add(self)  # flush() wakes it when the Mux drains
            else:
                events |= EVENT_READ
        self.mux.loop.watch(self.sock, events, self.on_event)

    def pause_reading(self, seconds):
        """A rate cap: stop reading the local socket for `seconds`."""
        self.paused = True
        self.update_interest()
        self.mux.loop.call_later(seconds, self.resume_reading)

    def resume_reading(self):
        """Read the local socket again after pause_reading()."""
        self.paused = False
        self.update_interest()

    def on_event(self, mask):
        """Loop callback: write first, then read."""
        if mask & EVENT_WRITE:
            self.on_writable()
        if mask & EVENT_READ and not self.closed:
            self.on_readable()

    def on_readable(self):
        """Read the local socket straight into one DATA frame, within credit."""
        mux = self.mux
        if mux.congested:
            mux.blocked.add(self)
            return self.update_interest()
        limit = FRAME_HEADER.size + min(self.credit, READ_CHUNK_BYTES)
        try:  # straight into the shared frame buffer, behind room for the header
            size = self.sock.recv_into(mux.scratch_view[FRAME_HEADER.size:limit])
        except (BlockingIOError, InterruptedError):
            return
        except SOCKET_GONE as exc:
            return self.abort("local read failed: %s" % exc)
        self.last_active = time.monotonic()
        if not size:
            self.read_closed = True
            mux.send(Msg.EOF, self.id)
            return self.finish_if_done()
        self.credit -= size
        mux.local_read_bytes += size
        FRAME_HEADER.pack_into(mux.scratch, 0, Msg.DATA, self.id, size)
        mux.send_view(mux.scratch_view[:FRAME_HEADER.size + size])
        pause = mux.pace(size) if mux.pace else 0
        if pause > 0:
            self.pause_reading(pause)
        elif not self.credit:
            self.update_interest()

    def on_writable(self):
        """A connect finished (or failed) or the socket has room: write what waits."""
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.local_connect_failed(os.strerror(err))
            self.connecting = False
        self.flush_pending()
        if not self.closed:
            self.update_interest()

    def on_connect_timeout(self):
        """The local service did not answer within the Mux's connect_timeout_s: reset the stream."""
        if self.connecting and not self.closed:
            self.mux.log.warning("local service unavailable stream=%d target=%s error=%s",
                                 self.id, self.target or "?",
                                 "no answer within %g s" % self.mux.connect_timeout_s)
            self.abort("%s after %g s" % (RESET_CONNECT_TIMED_OUT, self.mux.connect_timeout_s))

    def local_connect_failed(self, reason):
        """The local connect failed: the owner may try another address
        (Mux.retry_local_connect swaps the socket), else the stream ends."""
        if self.mux.retry_local_connect(self, reason):
            return None
        self.mux.log.warning("local service unavailable stream=%d target=%s error=%s",
                             self.id, self.target or "?", reason)
        return self.abort("%s: %s" % (RESET_CONNECT_FAILED, reason))

    def on_reset(self, payload):
        """The peer aborted the stream: keep its reason for the owner, close."""
        self.reset_reason = bytes(payload[:512]).decode("utf-8", "replace")
        self.destroy()

    def replace_socket(self, sock, connecting):
        """Go on with another local socket (a connect to the next address)."""
        self.mux.loop.watch(self.sock, 0)
        self.sock.close()
        self.sock, self.connecting = sock, connecting
        self.update_interest()

    def send_first(self, data):
        """Bytes of our own (a PROXY protocol header) written to the local
        socket before anything from the peer; never credited back."""
        self.uncredited += len(data)
        self.keep(data)

    def on_data(self, payload):
        """A piece of DATA (a view valid only now): write it, or keep a copy."""
        self.unacked += len(payload)
        if self.unacked > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: data beyond the window" % self.id)
        if self.peer_eof:
            raise ProtocolError("stream %d: data after EOF" % self.id)
        self.last_active = time.monotonic()
        if self.pending:
            self.keep(payload)
            return
        try:  # even while connecting: a loopback connect is done by now, send says if not
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except SOCKET_GONE as exc:
            if self.connecting:
                self.keep(payload)  # for the next address, if there is one
                return self.local_connect_failed(exc.strerror or str(exc))
            return self.abort("local write failed: %s" % exc)
        if sent and self.connecting:
            self.connecting = False
            self.update_interest()
        self.count_delivered(sent)
        if sent < len(payload):
            self.keep(payload[sent:])

    def keep(self, payload):
        """Keep a copy of what the socket did not take; write it when it has room."""
        was_empty = not self.pending
        self.pending.append(bytes(payload))
        self.pending_bytes += len(payload)
        self.mux.note_buffered(len(payload))
        if was_empty:
            self.drained_at = time.monotonic()
            self.update_interest()

    def count_delivered(self, sent):
        """Bytes reached the local socket: count them, return credit in batches."""
        own = min(sent, self.uncredited)
        self.uncredited -= own
        sent -= own
        self.delivered += sent
        self.mux.local_written_bytes += sent
        if self.delivered >= WINDOW_UPDATE_BYTES:
            self.mux.send(Msg.WINDOW, self.id, U32.pack(self.delivered))
            self.unacked -= self.delivered
            self.delivered = 0

    def flush_pending(self):
        """Write what the peer sent; return credit; half-close after its EOF."""
        while self.pending:
            chunk = self.pending[0]
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except SOCKET_GONE as exc:
                return self.abort("local write failed: %s" % exc)
            self.pending_bytes -= sent
            self.drained_at = time.monotonic()
            self.mux.note_buffered(-sent)
            self.count_delivered(sent)
            if sent < len(chunk):
                self.pending[0] = chunk[sent:]
                break
            self.pending.popleft()
        if self.peer_eof and not self.pending and not self.write_closed:
            self.shutdown_write()

    def shutdown_write(self):
        """Half-close: the peer sent EOF and everything is written."""
        self.write_closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except SOCKET_GONE:
            pass
        self.finish_if_done()

    def on_window(self, payload):
        """The peer returned credit; ProtocolError if it grows past the window."""
        if len(payload) != U32.size:
            raise ProtocolError("stream %d: bad WINDOW frame" % self.id)
        was_blocked = self.credit <= 0
        self.credit += U32.unpack(payload)[0]
        if self.credit > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: window grew past its size" % self.id)
        if was_blocked:
            self.update_interest()

    def on_eof(self):
        """The peer sends no more: half-close once what waits is written."""
        self.peer_eof = True
        if not self.connecting and not self.pending:
            self.shutdown_write()

    def finish_if_done(self):
        """Destroy the stream once both directions are closed."""
        if self.read_closed and self.write_closed:
            self.destroy()
        else:
            self.update_interest()

    def abort(self, reason):
        """Close the stream now and tell the peer why."""
        if not self.closed:
            self.mux.send(Msg.RESET, self.id, reason.encode()[:512])
            self.mux.log.debug("stream reset stream=%d reason=%r", self.id, reason)
            self.destroy()

    def crash(self, _exc):
        """A callback of this stream raised (EventLoop.contain): reset it alone."""
        self.abort("internal error")

    def destroy(self):
        """Close the socket and forget the stream; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.mux.loop.watch(self.sock, 0)
        self.sock.close()
        if self.pending_bytes:
            self.mux.note_buffered(-self.pending_bytes)
            self.pending_bytes = 0
        self.pending.clear()
        self.mux.streams.pop(self.id, None)
        self.mux.blocked.discard(self)
        self.mux.on_stream_closed(self)


class Mux:
    """The multiplexed tunnel connection on either side; `receives` is the set of frame
    types the peer may send. Owners override the hooks at the end (on_open() on the
    pod, on_control(), on_closed() ...); destroy() calls on_closed(reason) once."""

    def __init__(self, loop, sock, receives, log, heartbeat_s=HEARTBEAT_INTERVAL_S):
        self.loop, self.sock, self.log = loop, sock, log
        self.decoder = FrameDecoder(receives)
        self.streams = {}
        self.blocked = set()
        self.highest_stream = 0
        self.out = bytearray()
        self.congested = False
        self.closed = False
        self.local_read_bytes = 0      # read from local sockets, sent as DATA
        self.local_written_bytes = 0   # received as DATA, written locally
        self.heartbeat_s = heartbeat_s
        self.last_heard = time.monotonic()
        self.heartbeat = loop.call_later(heartbeat_s, self.on_heartbeat)
        self.pace = None      # owner's rate cap: callable(bytes moved) -> seconds to pause
        self.reading_paused = False    # held back by the rate cap or the buffer budget:
        self.rate_hold = self.pressure_hold = False
        self.buffered = 0              # bytes in this Mux's Streams waiting for local sockets
        self.buffer_budget = loop.buffer_budget  # the owner may set a smaller one
        self.connect_timeout_s = LOCAL_CONNECT_TIMEOUT_S  # ... and another connect timeout
        self.scratch, self.scratch_view = loop.scratch, loop.scratch_view  # shared, see EventLoop
        self.inbox, self.inbox_view = loop.inbox, loop.inbox_view
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)
        loop.call_later(0, self.on_readable)  # TLS may hold bytes read during the greeting

    # -- sending -------------------------------------------------------
    def send(self, msg, stream, payload=b""):
        """Queue one frame and write what the socket takes."""
        self.queue(msg, stream, payload)
        self.flush()

    def queue(self, msg, stream, payload=b""):
        """Add a frame to `out`; the next send or flush writes it."""
        if self.closed:
            return
        self.out += FRAME_HEADER.pack(msg, stream, len(payload))
        self.out += payload
        if len(self.out) > MUX_HIGH_WATER_BYTES:
            self.congested = True

    def send_view(self, view):
        """Send a whole frame from a view; only what the socket refuses is copied."""
        if self.closed:
            return
        if self.out:
            self.out += view
            if len(self.out) > MUX_HIGH_WATER_BYTES:
                self.congested = True
            return self.flush()
        try:
            sent = self.sock.send(view)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            sent = 0
        except SOCKET_GONE as exc:
            return self.destroy("send failed: %s" % exc)
        if sent < len(view):
            self.out += view[sent:]
            reading = 0 if self.reading_paused else EVENT_READ
            self.loop.watch(self.sock, reading | EVENT_WRITE, self.on_event)

    def send_control(self, msg, obj):
        """Send a stream-0 frame with obj as its JSON payload."""
        self.send(msg, 0, json.dumps(obj, separators=(",", ":")).encode())

    def flush(self):
        """Write `out` while the socket takes it; wake blocked streams below the low water mark."""
        while self.out and not self.closed:
            try:
                with memoryview(self.out) as view:
                    sent = self.sock.send(view[:WRITE_CHUNK_BYTES])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except SOCKET_GONE as exc:
                return self.destroy("send failed: %s" % exc)
            del self.out[:sent]
        if self.closed:
            return
        if self.congested and len(self.out) <= MUX_LOW_WATER_BYTES:
            self.congested = False
            for stream in list(self.blocked):
                stream.update_interest()
            self.blocked.clear()
        events = (0 if self.reading_paused else EVENT_READ) | (EVENT_WRITE if self.out else 0)
        self.loop.watch(self.sock, events, self.on_event)

    # -- receiving -----------------------------------------------------
    def on_event(self, mask):
        """Loop callback: write first, then read unless a rate cap paused reading."""
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and not self.closed and not self.reading_paused:
            self.on_readable()

    def on_readable(self):
        """Up to 16 batches of what has arrived, fewer for a peer that sends
        many small frames (MUX_FRAMES_PER_TURN), so other connections get
        their turn; replies to control frames go out once per batch."""
        if self.closed or self.reading_paused:
            return
        frames = 0
        for _ in range(16):
            size, eof = self.read_batch()
            if size:
                self.last_heard = time.monotonic()
            try:
                for msg, stream, payload in self.decoder.frames(self.inbox_view[:size]):
                    frames += 1
                    self.dispatch(msg, stream, payload)
                    if self.closed:
                        return
            except ProtocolError as exc:
                return self.fail(str(exc))
            if self.out:
                self.flush()
            if eof:
                return self.destroy(eof)
            pause = self.pace(size) if self.pace and size else 0
            if pause > 0:
                return self.pause_reading(pause)
            if size < len(self.inbox) or self.reading_paused:
                return
            if frames > MUX_FRAMES_PER_TURN:
                break
        pending = getattr(self.sock, "pending", None)
        if not self.closed and not self.reading_paused and pending and pending():
            self.loop.call_later(0, self.on_readable)

    def read_batch(self):
        """Fill the inbox with what has arrived (a TLS read returns one record,
        so many reads make one batch and few local writes); (size, eof reason)."""
        view, size = self.inbox_view, 0
        while size < len(view):
            try:
                got = self.sock.recv_into(view[size:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return size, None
            except SOCKET_GONE as exc:
                return size, "receive failed: %s" % exc
            if not got:
                return size, "connection closed by peer"
            size += got
        return size, None

    def pause_reading(self, seconds):
        """A rate cap: stop reading the peer for a while (writes go on)."""
        self.rate_hold = True
        self.hold_reads()
        self.loop.call_later(seconds, self.end_rate_hold)

    def end_rate_hold(self):
        """The rate cap's pause is over: read again."""
        self.rate_hold = False
        self.resume_reading()

    def hold_reads(self):
        """Stop reading the peer (writes go on) until resume_reading()."""
        self.reading_paused = True
        if not self.closed:
            self.loop.watch(self.sock, EVENT_WRITE if self.out else 0, self.on_event)

    def resume_reading(self):
        """Read the peer again after pause_reading()."""
        if self.closed or self.rate_hold or self.pressure_hold or not self.reading_paused:
            return
        self.reading_paused = False
        self.flush()
        self.on_readable()

    def dispatch(self, msg, stream_id, payload):
        """Hand one frame to its stream, to on_frame_0 or to on_open_frame."""
        if stream_id == 0:
            return self.on_frame_0(msg, payload)
        if msg == Msg.OPEN:
            return self.on_open_frame(stream_id, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream:
                raise ProtocolError("frame for unknown stream %d" % stream_id)
            return  # frames in flight for a stream closed here are expected
        try:
            if msg == Msg.DATA:
                stream.on_data(payload)
            elif msg == Msg.WINDOW:
                stream.on_window(payload)
            elif msg == Msg.EOF:
                stream.on_eof()
            elif msg == Msg.RESET:
                stream.on_reset(payload)
            else:
                raise ProtocolError("%s is not a stream frame" % msg.name)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - one stream's bug ends only that stream
            self.loop.contain(stream.crash, exc)

    def on_frame_0(self, msg, payload):
        """A frame on stream 0: answer PING, ignore PONG, the rest to on_control()."""
        if msg == Msg.PING:
            if len(self.out) <= CONTROL_REPLY_LIMIT_BYTES:  # else the peer reads no replies
                self.queue(Msg.PONG, 0, payload)  # sent once per batch (on_readable)
        elif msg == Msg.PONG:
            pass  # any frame counts as a sign of life
        else:
            self.on_control(msg, decode_control(payload))

    def on_open_frame(self, stream_id, payload):
        """A new stream from the peer: check its id and port, then on_open()."""
        if stream_id <= self.highest_stream:
            raise ProtocolError("bad OPEN for stream %d" % stream_id)
        port, consumer, public = decode_open(payload)
        self.highest_stream = stream_id
        self.open_contained(stream_id, self.on_open, port, consumer, public)

    def open_contained(self, stream_id, opener, *args):
        """opener(stream_id, *args) opens the stream: anything it raises but
        ProtocolError (a bug; no descriptor left for the local socket) ends
        that stream alone (EventLoop.contain), not the connection."""
        try:
            return opener(stream_id, *args)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - one stream's failure ends only that stream
            return self.loop.contain(opener, exc, lambda _exc: self.reset_opened(stream_id))

    def reset_opened(self, stream_id):
        """End a stream whose opening failed, made or not yet."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream.abort("internal error")
        return self.send(Msg.RESET, stream_id, b"internal error")

    # -- the buffer budget ---------------------------------------------
    def note_buffered(self, delta):
        """Bytes waiting in this Mux's Streams changed by `delta`. Past this
        Mux's or the loop's budget, the peer (who produces them) is no longer
        read; the loop lets it read again below half of both (EventLoop.relieve)."""
        loop = self.loop
        was_empty = not self.buffered
        self.buffered += delta
        loop.buffered += delta
        if delta > 0:
            if was_empty:
                loop.holders.add(self)
            if not self.pressure_hold and (self.buffered > self.buffer_budget
                                           or loop.buffered > loop.buffer_budget):
                self.log.debug("reads held back, buffer budget reached buffered=%d total=%d",
                               self.buffered, loop.buffered)
                self.pressure_hold = True
                loop.press(self)
                self.hold_reads()
        else:
            if not self.buffered:
                loop.holders.discard(self)
            if loop.pressed:
                loop.relieve()

    def release(self):
        """Called by the loop, possibly inside a Stream's write: resume on a timer."""
        self.loop.pressed.discard(self)
        self.pressure_hold = False
        self.loop.call_later(0, self.resume_reading)

    def reap_stalled(self, now, stall_s):
        """Under pressure: reset the streams whose local socket took nothing
        for stall_s (a reader that does not read), so the budget serves others."""
        for stream in [s for s in self.streams.values()
                       if s.pending and now - s.drained_at > stall_s]:
            self.log.info("stream reset, reader stalled under buffer pressure stream=%d bytes=%d",
                          stream.id, stream.pending_bytes)
            stream.abort("reader stalled for %g s while the buffer budget was used up" % stall_s)

    # -- streams -------------------------------------------------------
    def add_stream(self, stream_id, sock, connecting=False):
        """Carry `sock` as stream `stream_id` over this connection."""
        sock.setblocking(False)
        stream = Stream(self, stream_id, sock, connecting)
        self.streams[stream_id] = stream
        return stream

    # -- liveness and teardown -----------------------------------------
    def on_heartbeat(self):
        """PING every interval; declare the peer dead the moment it has been
        silent for three intervals (the next check is timed for that)."""
        if self.closed:
            return
        if self.reading_paused:  # we are not listening: its silence says nothing
            self.last_heard = time.monotonic()
        silent = time.monotonic() - self.last_heard
        if silent >= 3 * self.heartbeat_s:
            return self.destroy("peer silent for %.1f s" % silent)
        self.send(Msg.PING, 0, U32.pack(int(silent)))
        next_check = min(self.heartbeat_s, 3 * self.heartbeat_s - silent)
        self.heartbeat = self.loop.call_later(max(next_check, 0.01), self.on_heartbeat)

    def fail(self, reason):
        """The peer broke the protocol: say why, then close."""
        self.log.warning("protocol error: %s", reason)
        self.send_control(Msg.GOAWAY, {"reason": reason})
        self.destroy("protocol error: %s" % reason)

    def crash(self, exc):
        """A callback of the connection raised (EventLoop.contain): close it."""
        self.destroy("internal error (%s)" % type(exc).__name__)

    def destroy(self, reason):
        """Close every stream and the connection; buffers are released at once."""
        if self.closed:
            return
        self.closed = True
        self.heartbeat.cancel()
        for stream in list(self.streams.values()):
            stream.destroy()
        self.loop.pressed.discard(self)
        self.loop.holders.discard(self)
        self.out = bytearray()
        self.decoder.buffer = bytearray()
        self.loop.watch(self.sock, 0)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_closed(reason)

    # -- for owners to override ----------------------------------------
    def on_open(self, stream_id, port, consumer=None, public=None):
        """May be overridden: the peer opened stream_id for its `port` service."""
        raise ProtocolError("OPEN is not expected here")

    def retry_local_connect(self, stream, reason):
        """A local connect failed; True when the owner goes on with another
        address (Stream.replace_socket), False to end the stream."""
        return False

    def on_control(self, msg, obj):
        """May be overridden: a control frame other than PING/PONG arrived."""
        raise ProtocolError("unexpected %s" % msg.name)

    def on_stream_closed(self, stream):
        """May be overridden: `stream` was destroyed."""

    def on_closed(self, reason):
        """May be overridden: the connection is closed, for `reason`."""
# ---- END SHARED relay ----
# ---- BEGIN SHARED process (identical in pipe2me_server.py and pipe2me_pod.py) ----
# How the long-running commands start: as many descriptors as allowed, the
# compiled code handed to a fresh interpreter (used by main() only), the service
# definitions that start them at boot (`service`) and the lock on the pid file.

def raise_open_file_limit():
    """Let the relay hold as many sockets as allowed: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# Python keeps, for the life of a process, most of the memory its compiler
# took for the script the process started with: about 8 MB for the pod and
# 11 MB for the server on Python 3.11. The server and `start` run for months,
# so they re-execute themselves once, keeping their PID, from the script's
# compiled code handed over in an anonymous in-memory file, with -S: both
# scripts use the standard library only, so nothing from site-packages
# belongs in the process.
CODE_FD_VARIABLE = "PIPE2ME_CODE_FD"
CODE_LOADER = ("import marshal,os,sys;"
               "code=marshal.load(os.fdopen(int(os.environ.pop('PIPE2ME_CODE_FD')),'rb'));"
               "del sys.argv[0];"
               "exec(code,{'__name__':'__main__','__file__':sys.argv[0],'__cached__':'memfd'})")


# glibc raises its mmap threshold to the size of any large block freed; from
# then on such blocks come from the heap, which fragments and does not shrink,
# so the bytes held for a crowd of slow readers would stay in RSS after they
# left. A fixed threshold keeps every block of 64 KiB or more (the relay's
# buffers) in a map of its own, returned to the system when freed.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def script_code(path):
    """The code this process runs as its script, as compiled at start (found
    on the stack), else `path` compiled anew (70 ms more for the server)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is globals():
            return frame.f_code
        frame = frame.f_back
    with open(path, "rb") as fh:
        return compile(fh.read(), path, "exec", dont_inherit=True)


def run_from_compiled_code(environment=None):
    """Re-execute this script from its compiled code (see above), with the
    `environment` variables added. Returns only when that is done already,
    not wanted (imported, run with -m, under a debugger, profiler or
    coverage tool) or not possible."""
    script = globals()
    path = script.get("__file__")
    if (script.get("__name__") != "__main__" or script.get("__cached__") or not path
            or sys.gettrace() or sys.getprofile()
            or not sys.executable or not hasattr(os, "memfd_create")):
        return
    try:
        code = script_code(path)
        fd = os.memfd_create("pipe2me-code", 0)
    except (OSError, SyntaxError, ValueError):
        return
    try:
        with open(fd, "wb", closefd=False) as fh:
            marshal.dump(code, fh)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        flags = ["-W" + option for option in sys.warnoptions] + ["-O"] * sys.flags.optimize
        for name, value in getattr(sys, "_xoptions", {}).items():
            flags += ["-X", name if value is True else "%s=%s" % (name, value)]
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        environment = dict({k: v for k, v in MALLOC_ENVIRONMENT.items() if k not in os.environ},
                           **(environment or {}), **{CODE_FD_VARIABLE: str(fd)})
        os.environ.update(environment)
        os.execv(sys.executable, [sys.executable, "-S"] + flags + ["-c", CODE_LOADER, path]
                 + sys.argv[1:])
    except OSError:
        for name in environment or ():
            os.environ.pop(name, None)
        os.close(fd)


SERVICE_RESTART_DELAY_S = 5          # between a failed run and the next

def systemd_quote(word):
    """One ExecStart word: `%` and `$` escaped, double-quoted when needed."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The verbs of a System V init script, after its own supervise(): a pid file,
# a stop that waits for the process, start/stop/status and @MORE_VERBS@.
SYSV_VERBS_TEMPLATE = """\
is_running() {
	[ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

do_stop() {
	if is_running; then
		kill "$(cat "$PIDFILE")"
		i=0
		while is_running && [ "$i" -lt @STOP_WAIT_S@ ]; do sleep 1; i=$((i + 1)); done
	fi
	rm -f "$PIDFILE"
}

case "$1" in
start)
	if is_running; then echo "@NAME@ is already running"; exit 0; fi
	(exec </dev/null >>"$LOGFILE" 2>&1; supervise) &  # exec: no copy of our stdout stays open
	echo $! >"$PIDFILE"
	;;
stop)
	do_stop
	;;
@MORE_VERBS@status)
	if is_running; then echo "@NAME@ is running"; else echo "@NAME@ is stopped"; exit 3; fi
	;;
*)
	echo "usage: $0 @USAGE@" >&2
	exit 2
	;;
esac
"""


def sysv_verbs(name, stop_wait_s, more_verbs, usage):
    """The end of an init script for the service `name`: its verbs, `more_verbs`
    (case branches, each ending in `;;`) before status; `usage` lists them all."""
    return (SYSV_VERBS_TEMPLATE.replace("@MORE_VERBS@", more_verbs).replace("@NAME@", name)
            .replace("@STOP_WAIT_S@", str(stop_wait_s)).replace("@USAGE@", usage))


def lock_pid_file(path, mode):
    """Hold an exclusive lock on `path` (created with `mode`), our PID written in it,
    for the life of the process: the open descriptor, or None when another process
    holds it (lock_holder_pid() names it). OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def lock_holder_pid(path):
    """The PID in `path` of the process that holds its lock, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except OSError:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)
# ---- END SHARED process ----

# =====================================================================
# TOKENS — tokens.conf in the original format; read by the store and the CLI
# =====================================================================

def parse_port_count(value):
    """A number of ports, 1 or more."""
    if not re.fullmatch(r"[0-9]{1,5}", value) or int(value) < 1:
        raise ValueError("not a number of ports (1 or more)")
    return int(value)


TOKEN_OPTIONS = {
    # option: (default, parser)
    "max_ports": (1, parse_port_count),
    "lifespan": (30 * 86400, parse_positive_duration),
    "extend": (False, parse_bool),
    "unique": (False, parse_bool),
    "max_traffic": (0, parse_bytes),
    "rate": (0, parse_bytes),
}
TOKEN_NAME = re.compile(r"[^\s=#]{4,200}")
# The first token and `tokens add` without max_ports allow this many ports, so
# the README's walkthrough (http,https) works with either; a line of
# tokens.conf without max_ports allows 1, as in the original.
ADDED_TOKEN_MAX_PORTS = 4


def parse_token_line(line):
    """`name = option:value ...` -> (name, options); raises ValueError."""
    if line.startswith("\ufeff"):
        raise ValueError("the line starts with a UTF-8 byte order mark; save the file without it")
    name, sep, rest = line.partition("=")
    name = name.strip()
    if not sep or not TOKEN_NAME.fullmatch(name):
        raise ValueError("expected 'name = option:value ...' with a name of 4+ characters")
    if "#" in rest:
        raise ValueError("a comment after the options; put comments on lines of their own")
    options = {key: default for key, (default, _) in TOKEN_OPTIONS.items()}
    for item in rest.split():
        key, colon, value = item.partition(":")
        if key not in TOKEN_OPTIONS or not colon:
            raise ValueError("unknown option %r (known: %s)" % (item, ", ".join(TOKEN_OPTIONS)))
        try:
            options[key] = TOKEN_OPTIONS[key][1](value)
        except ValueError as exc:
            raise ValueError("bad value %r for %s: %s" % (value[:40], key, exc)) from None
    return name, options


def format_token_line(name, options):
    """One tokens.conf line: `name = option:value ...`."""
    shown = " ".join("%s:%s" % (key, shown_value(value)) for key, value in options.items())
    return "%s = %s" % (name, shown)


def load_tokens(path, problems=None):
    """Return {name: options}. A bad line (and every line of a name given
    twice) is skipped; its "file:line: reason" goes to `problems` if given,
    else to the log."""
    tokens, seen = {}, {}
    report = problems.append if problems is not None else (
        lambda problem: log.warning("bad token line skipped at %s", problem))
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return tokens
    except (OSError, UnicodeDecodeError) as exc:
        report("cannot read tokens file %s: %s" % (path, exc))
        lines = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, options = parse_token_line(line)
        except ValueError as exc:
            report("%s:%d: %s" % (path, number, exc))
            continue
        if name in seen:
            report("%s:%d: token %s is also on line %d; neither line is used"
                   % (path, number, mask_secret(name), seen[name]))
            tokens.pop(name, None)
            continue
        seen[name] = number
        tokens[name] = options
    return tokens


def new_token_name():
    """A fresh random token name."""
    return "p2m-" + secrets.token_urlsafe(18)


def ensure_tokens_file(path):
    """Write a tokens file with one fresh token if none exists; returns it or None."""
    if os.path.exists(path):
        return None
    name = new_token_name()
    options = parse_token_line("%s = max_ports:%d extend:true" % (name, ADDED_TOKEN_MAX_PORTS))[1]
    text = ("# pipe2me tokens: name = option:value ...\n"
            "# options: max_ports lifespan(s/m/h/d) extend unique max_traffic(K/M/G) rate\n"
            + format_token_line(name, options) + "\n")
    write_atomic(path, text, 0o600)
    return name


# =====================================================================
# STATE STORE — owns STATE_DIR/tunnels/*.json, the port pool,
# STATE_DIR/server.lock and who is connected (STATE_DIR/connected.json);
# used by the API, the sessions and the admin CLI.
# All methods are thread-safe.
# =====================================================================

STATE_VERSION = 1
TUNNEL_ID = re.compile(r"[0-9a-f]{16}")


def warn_if_ports_meet_ephemeral_range(ports):
    """Log a warning when TUNNEL_PORTS overlaps the kernel's ephemeral port range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return
    if ports[0] <= last and first <= ports[-1]:
        log.warning("TUNNEL_PORTS %d..%d meets the kernel's ephemeral ports %d..%d: an outgoing "
                    "connection can hold a public port for a while (net.ipv4.ip_local_port_range)",
                    ports[0], ports[-1], first, last)


class PortPool:
    """TUNNEL_PORTS as a min-heap of free ports, so a creation takes the
    lowest free port in O(log n) instead of scanning from the first one.

    Entries are removed lazily: a held port may still sit in the heap and is
    dropped when it comes up. A port that another socket on this machine
    holds is set aside and offered again after PORT_RETRY_S."""

    def __init__(self, ports):
        self.ports = ports
        self.free = list(ports)  # a sorted list is a heap
        self.held = set()
        self.aside = collections.deque()  # (monotonic retry time, port)

    def release(self, port):
        """`port` is free again (if it is still in TUNNEL_PORTS)."""
        if port in self.held:
            self.held.discard(port)
            if port in self.ports:
                heapq.heappush(self.free, port)

    def pick(self, count, usable):
        """The `count` lowest free ports for which usable(port) is true, now
        held; Unavailable if the range has no more."""
        now = time.monotonic()
        while self.aside and (self.aside[0][0] <= now or not self.free):  # set aside, now due
            heapq.heappush(self.free, self.aside.popleft()[1])
        picked = []
        while len(picked) < count and self.free:
            port = heapq.heappop(self.free)
            if port in self.held or port in picked:
                continue
            if usable(port):
                picked.append(port)
            else:
                self.aside.append((now + PORT_RETRY_S, port))
        if len(picked) < count:
            for port in picked:
                heapq.heappush(self.free, port)
            raise Unavailable("no free public ports left in TUNNEL_PORTS")
        self.held.update(picked)
        return picked


class Store:
    """Tunnel records, one JSON file each, written atomically. A port or a name
    belongs to a tunnel while its file exists and it has not passed expires_at
    + PORT_GRACE, so after any crash the port pool is what the files say.
    Callers get copies, never the live dicts. Indexes kept as records change
    (ports, names, certificates, tunnels per token, the order of expiries)
    answer every lookup, so no request, change or sweep walks all tunnels."""

    def __init__(self, settings):
        self.settings = settings
        self.lock = threading.RLock()
        self.on_change = lambda tunnel_id: None
        self.used_path = os.path.join(settings.state_dir, "used_tokens.json")
        self.used_saved = set()  # what used_tokens.json holds
        self.reset({}, set())

    def reset(self, tunnels, used):
        """Take `tunnels` and `used` as the whole state and index them."""
        self.tunnels, self.used_tokens = tunnels, used
        self.pool = PortPool(self.settings.tunnel_ports)
        self.names, self.certs, self.by_token = {}, {}, {}
        self.expiries, self.releases = [], []
        now = time.time()
        # tunnels past their grace are indexed first: a name a live tunnel
        # took over from one of them points to the live tunnel
        for record in sorted(tunnels.values(), key=lambda r: self.holds_resources(r, now)):
            self.index(record, holds=self.holds_resources(record, now))
        heapq.heapify(self.expiries)
        heapq.heapify(self.releases)

    def index(self, record, holds=True, push=list.append):
        """Enter `record` in the indexes; `push` adds to the expiry heaps (None: its
        entries are there already)."""
        tunnel_id = record["id"]
        if holds:
            self.pool.held.update(record["ports"])
        self.names[record["fqdn"]] = tunnel_id
        self.certs.update((fp, tunnel_id) for fp in record.get("cert_sha256", []))
        if time.time() < record["expires_at"]:  # live tunnels only: what the cap counts
            self.by_token.setdefault(record.get("token_sha256"), set()).add(tunnel_id)
        if push is not None:
            push(self.expiries, (record["expires_at"], tunnel_id))
            push(self.releases, (record["expires_at"] + self.settings.port_grace, tunnel_id))

    def unindex(self, record):
        """Forget what `record` holds; its heap entries go stale and are dropped lazily."""
        tunnel_id = record["id"]
        for port in record["ports"]:
            self.pool.release(port)
        if self.names.get(record["fqdn"]) == tunnel_id:
            del self.names[record["fqdn"]]
        for fp in record.get("cert_sha256", []):
            if self.certs.get(fp) == tunnel_id:
                del self.certs[fp]
        ids = self.by_token.get(record.get("token_sha256"), set())
        ids.discard(tunnel_id)
        if not ids:
            self.by_token.pop(record.get("token_sha256"), None)

    def put(self, record):
        """Make `record` the live one, re-indexed (the caller holds the lock)."""
        old = self.tunnels.get(record["id"])
        if old is not None:
            self.unindex(old)
        self.tunnels[record["id"]] = record
        same_expiry = old is not None and old["expires_at"] == record["expires_at"]
        self.index(record, push=None if same_expiry else heapq.heappush)

    def load(self):
        """Read every tunnel file; unreadable ones are logged and left alone.

        Holds the lock while reading: a tunnel created between the listing and
        the swap (SIGHUP during API traffic) would be forgotten, its ports reused."""
        os.makedirs(self.settings.tunnel_dir, mode=0o700, exist_ok=True)
        with self.lock:
            tunnels = {}
            for name in sorted(os.listdir(self.settings.tunnel_dir)):
                if not (name.endswith(".json") and TUNNEL_ID.fullmatch(name[:-5])):
                    continue
                try:
                    record = read_json(os.path.join(self.settings.tunnel_dir, name))
                except (OSError, ValueError) as exc:
                    log.error("unreadable tunnel file=%s error=%s", name, exc)
                    continue
                tunnels[record["id"]] = record
            saved = set()
            if os.path.exists(self.used_path):
                saved = set(read_json(self.used_path).get("used", []))
            # a crash between a tunnel's file and used_tokens.json loses nothing:
            # the tunnel file names its single-use token, written down here at once
            used = saved | {r["token_sha256"] for r in tunnels.values() if r.get("token_unique")}
            self.reset(tunnels, used)
            self.used_saved = saved
            if used != saved:
                try:
                    self.mark_token_used()
                except OSError as exc:  # read-only: delete() writes it before a tunnel file goes
                    log.warning("used tokens not written file=%s error=%s", self.used_path,
                                exc.strerror)
                else:
                    log.info("single-use tokens recovered from tunnel files file=%s",
                             self.used_path)
        return len(tunnels)

    # -- queries -----------------------------------------------------
    def get(self, tunnel_id):
        """A copy of the tunnel's record, or None."""
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            return json.loads(json.dumps(record)) if record else None

    def all(self):
        """Copies of every record."""
        with self.lock:
            return [json.loads(json.dumps(r)) for r in self.tunnels.values()]

    def count(self):
        """How many tunnels the store holds."""
        return len(self.tunnels)

    def online_ports(self, now):
        """{tunnel id: ports} of every online tunnel (for a full listener sync)."""
        with self.lock:
            return {i: list(r["ports"]) for i, r in self.tunnels.items()
                    if tunnel_status(r, now) == "online"}

    def metric_rows(self):
        """What /metrics shows of every tunnel (id, fqdn, expires_at, bytes),
        without copying whole records."""
        keys = ("id", "fqdn", "expires_at", "bytes_in", "bytes_out")
        with self.lock:
            return [{key: r[key] for key in keys} for r in self.tunnels.values()]

    def by_fqdn(self, fqdn):
        """A copy of the record of that name, or None."""
        with self.lock:
            record = self.tunnels.get(self.names.get(fqdn))
            return dict(record) if record else None

    def by_cert(self, fingerprint):
        """A copy of the record whose certificates include this SHA-256, or None."""
        with self.lock:
            record = self.tunnels.get(self.certs.get(fingerprint))
            return dict(record) if record else None

    def holds_resources(self, record, now):
        """Whether the record still holds its ports and name (until PORT_GRACE after expiry)."""
        return now < record["expires_at"] + self.settings.port_grace

    # -- changes -----------------------------------------------------
    def save(self, record):
        """Write the record's file (mode 0600, atomically)."""
        path = os.path.join(self.settings.tunnel_dir, record["id"] + ".json")
        write_json(path, record, mode=0o600)

    def create(self, token_name, options, protocols, now=None, extra=None):
        """Reserve a name and ports and write the record (with the `extra`
        settings, e.g. proxy_protocol); returns (record, secret)."""
        now = int(now or time.time())
        token_hash, secret = sha256_hex(token_name), secrets.token_urlsafe(24)
        with self.lock:
            self.check_token_use(token_hash, options, now)
            # one bind per port handed out: no other socket on this machine may hold it (a
            # listener of another program, or an outgoing connection's local port when the
            # range meets the kernel's ephemeral range)
            ports = self.pool.pick(len(protocols), functools.partial(
                port_can_listen, self.settings.listen_address))
            tunnel_id = self.new_id()
            try:
                record = {
                    "version": STATE_VERSION, "id": tunnel_id,
                    "fqdn": self.new_fqdn(), "protocols": list(protocols),
                    "ports": ports, "token_sha256": token_hash,
                    "secret_sha256": sha256_hex(secret), "created_at": now,
                    "expires_at": now + options["lifespan"], "cert_sha256": [],
                    "bytes_in": 0, "bytes_out": 0,
                    "max_traffic": options["max_traffic"], "rate": options["rate"],
                    "token_unique": options["unique"],
                }
                record.update(extra or {})
                self.save(record)  # first: a unique token's use is also read from here
                if options["unique"]:
                    self.mark_token_used(token_hash)
            except BaseException:
                for port in ports:
                    self.pool.release(port)
                with contextlib.suppress(OSError):  # no tunnel whose token's use is unwritten
                    os.unlink(os.path.join(self.settings.tunnel_dir, tunnel_id + ".json"))
                raise
            self.put(record)
        self.on_change(tunnel_id)
        return dict(record), secret

    def check_token_use(self, token_hash, options, now):
        """Rejected if a used single-use token or a token at MAX_TUNNELS_PER_TOKEN."""
        if options["unique"] and token_hash in self.used_tokens:
            raise Rejected("this token was for one use and has been used")
        cap = self.settings.max_tunnels_per_token
        if cap and sum(now < self.tunnels[i]["expires_at"]
                       for i in self.by_token.get(token_hash, ())) >= cap:
            log.warning("tunnel cap reached token_sha256=%s cap=%d", token_hash[:12], cap)
            raise Rejected("this token already has %d live tunnels (MAX_TUNNELS_PER_TOKEN)" % cap)

    def mark_token_used(self, *token_hashes):
        """Write used_tokens.json: the used single-use tokens and `token_hashes`."""
        used = self.used_tokens | set(token_hashes)
        write_json(self.used_path, {"version": STATE_VERSION, "used": sorted(used)}, 0o600)
        self.used_tokens = self.used_saved = used

    def extend(self, tunnel_id, token_name, options, now=None):
        """Push the tunnel's expiry by the token's lifespan; a single-use
        token is spent by it (and refused once spent). Returns the new copy."""
        token_hash = sha256_hex(token_name)
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None:
                return None
            if options["unique"]:
                if token_hash in self.used_tokens:
                    raise Rejected("this token was for one use and has been used")
                self.mark_token_used(token_hash)  # first: a crash spends it, extends nothing
            expires = max(record["expires_at"], int(now or time.time())) + options["lifespan"]
            return self.update(tunnel_id, expires_at=expires)

    def new_id(self):
        """A fresh tunnel id (16 hex digits) no record has."""
        while True:
            candidate = secrets.token_hex(8)
            if candidate not in self.tunnels:
                return candidate

    def new_fqdn(self):
        """A three-word name under the domain that no record holds (a numbered suffix after 20
        tries)."""
        domain = self.settings.tunnel_domain
        for attempt in range(200):
            words = "-".join(secrets.choice(w) for w in (MOODS, COLORS, ANIMALS))
            name = "%s.%s" % (words if attempt < 20 else "%s-%d" % (words, attempt), domain)
            if name not in self.names:
                return name
        raise Unavailable("could not find a free name")

    def update(self, tunnel_id, **changes):
        """Apply changes to a record and save it; returns the new copy or None."""
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None:
                return None
            updated = dict(record, **changes)
            self.save(updated)
            self.put(updated)
        self.on_change(tunnel_id)
        return dict(updated)

    def add_traffic(self, tunnel_id, bytes_in, bytes_out):
        """Add relayed bytes to the tunnel's counters and save them."""
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None or not (bytes_in or bytes_out):
                return
            record["bytes_in"] += bytes_in
            record["bytes_out"] += bytes_out
            self.save(record)

    def delete(self, tunnel_id):
        """Remove the tunnel's file and record; False if there was none."""
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None:
                return False
            if record.get("token_unique") and record["token_sha256"] not in self.used_saved:
                self.mark_token_used(record["token_sha256"])  # its file was the only proof
            with contextlib.suppress(FileNotFoundError):  # an OSError leaves the tunnel as it was
                os.unlink(os.path.join(self.settings.tunnel_dir, tunnel_id + ".json"))
                fsync_dir(self.settings.tunnel_dir)
            self.unindex(record)
            del self.tunnels[tunnel_id]
        self.on_change(tunnel_id)
        return True

    def due(self, heap, now, offset):
        """Pop and return the ids whose time in `heap` has come (stale entries,
        left by an extension or a deletion, are dropped)."""
        ids = []
        with self.lock:
            while heap and heap[0][0] <= now:
                when, tunnel_id = heapq.heappop(heap)
                record = self.tunnels.get(tunnel_id)
                if (record is not None and record["expires_at"] + offset <= when
                        and tunnel_id not in ids):
                    ids.append(tunnel_id)
        return ids

    def expire(self, now):
        """Ids of tunnels that went offline since the last call (once a second
        from the sweep); each is announced through on_change."""
        with self.lock:  # one hold: a tunnel deleted after due() would be missing below
            expired = self.due(self.expiries, now, 0)
            for tunnel_id in expired:  # no longer counted against its token's cap
                token_hash = self.tunnels[tunnel_id].get("token_sha256")
                self.by_token.get(token_hash, set()).discard(tunnel_id)
        for tunnel_id in expired:
            self.on_change(tunnel_id)
        return expired

    def purge_stale(self, now):
        """Forget tunnels past their grace period; returns their ids."""
        stale = self.due(self.releases, now, self.settings.port_grace)
        for tunnel_id in stale:
            try:
                self.delete(tunnel_id)
            except OSError as exc:  # read-only STATE_DIR: tried again a sweep later
                log.error("stale tunnel not removed tunnel=%s error=%s", tunnel_id, exc.strerror)
                with self.lock:
                    heapq.heappush(self.releases, (now + SWEEP_INTERVAL_S, tunnel_id))
        return stale


def tunnel_status(record, now=None):
    """"online" or "expired" at `now`."""
    return "online" if (now or time.time()) < record["expires_at"] else "expired"


def public_view(record, settings, now=None, presence=None):
    """What the API shows of a tunnel (never a secret or a hash). `status`
    is the original's word for `expired`: "online" until expires_at, kept
    for pods that read it; `connected` comes from `presence`."""
    urls = ["%s://%s:%d" % (proto, record["fqdn"], port)
            for proto, port in zip(record["protocols"], record["ports"])]
    view = {
        "id": record["id"], "fqdn": record["fqdn"], "protocols": record["protocols"],
        "ports": record["ports"], "urls": urls, "status": tunnel_status(record, now),
        "expired": tunnel_status(record, now) == "expired",
        "created_at": record["created_at"], "expires_at": record["expires_at"],
        "tunnel_port": settings.tunnel_port, "tunnel_domain": settings.tunnel_domain,
        "bytes_in": record["bytes_in"], "bytes_out": record["bytes_out"],
        "proxy_protocol": record.get("proxy_protocol") or "off",
    }
    view.update(presence.view(record["id"]) if presence is not None else
                {"connected": False, "connected_since": None, "last_seen": None})
    return view


class Presence:
    """Whether each tunnel's pod is connected now (since when, from where)
    and when it was last seen. The running server keeps it in memory (the
    sessions change it, the API reads it from its threads) and writes
    STATE_DIR/connected.json at most once per sweep, for the admin CLI."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "connected.json")
        self.lock = threading.Lock()
        self.connected = {}   # tunnel id -> {"since": epoch, "pod": "ip:port"}
        self.last_seen = {}   # tunnel id -> epoch the last session ended
        self.dirty = False

    def load(self, server_running):
        """Read the file; without a running server nobody is connected, and
        the pods listed as connected were last seen when it was written."""
        try:
            data = read_json(self.path)
            written = os.path.getmtime(self.path)
        except (OSError, ValueError):
            return self
        with self.lock:
            self.last_seen = {k: v for k, v in dict(data.get("last_seen") or {}).items()
                              if isinstance(v, (int, float))}
            connected = dict(data.get("connected") or {})
            if server_running:
                self.connected = connected
            else:
                self.last_seen.update({tunnel_id: written for tunnel_id in connected})
        return self

    def connect(self, tunnel_id, pod):
        """The tunnel's pod connected now, from `pod`."""
        with self.lock:
            self.connected[tunnel_id] = {"since": int(time.time()), "pod": pod}
            self.dirty = True

    def disconnect(self, tunnel_id):
        """The tunnel's pod is gone; remember when it was last seen."""
        with self.lock:
            if self.connected.pop(tunnel_id, None) is not None:
                self.last_seen[tunnel_id] = int(time.time())
                self.dirty = True

    def view(self, tunnel_id):
        """{"connected", "connected_since", "last_seen"} of one tunnel."""
        with self.lock:
            now = self.connected.get(tunnel_id)
            return {"connected": now is not None, "connected_since": now and now["since"],
                    "last_seen": None if now else self.last_seen.get(tunnel_id)}

    def forget(self, tunnel_id):
        """The tunnel is gone: drop what is known of it."""
        with self.lock:
            gone = (self.connected.pop(tunnel_id, None), self.last_seen.pop(tunnel_id, None))
            self.dirty = self.dirty or gone != (None, None)

    def keep_only(self, known):
        """At start and reload: forget tunnels not in `known` (ids to keep)."""
        with self.lock:
            self.last_seen = {k: v for k, v in self.last_seen.items() if k in known}
            self.dirty = True

    def save(self):
        """Write the file when something changed."""
        with self.lock:
            if not self.dirty:
                return
            data = {"version": STATE_VERSION, "connected": dict(self.connected),
                    "last_seen": dict(self.last_seen)}
            self.dirty = False
        try:
            write_json(self.path, data, 0o600)
        except OSError as exc:
            log.error("connected.json not written error=%s", exc.strerror)
            self.dirty = True

def lock_state_dir(state_dir):
    """Hold STATE_DIR/server.lock for the life of the process, or refuse (exit 3)."""
    fd = lock_pid_file(os.path.join(state_dir, "server.lock"), 0o600)
    if fd is None:
        raise Unavailable("another pipe2me server is running on %s" % state_dir)
    return fd


def running_server_pid(state_dir):
    """PID of the server holding the lock on state_dir, or None."""
    return lock_holder_pid(os.path.join(state_dir, "server.lock"))


# =====================================================================
# CERTIFICATES — owns STATE_DIR/ca (CA key and cert, issued/) and each
# tunnel's certificate list; used by the API (POST /tunnels/<id>/cert, GET
# /cacert), the tunnel sessions (which certificate may connect) and the
# wiring (the TLS certificate of HTTPS_PORT and TUNNEL_PORT)
# =====================================================================

CSR_MAX_BYTES = 64 * 1024
CA_VALIDITY_DAYS = 3650
LEAF_BACKDATE_S = 300            # tolerate pods whose clocks run a little slow
SERVER_CERT_RENEW_BEFORE_S = 7 * 86400
CERT_KEEP = 3                    # certificates a tunnel lists: the last used one, then newer
CERT_PRUNE_INTERVAL_S = 3600     # how often signing also sweeps issued/ of deleted tunnels
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 16384             # OpenSSL's own ceiling for RSA verification

# The AlgorithmIdentifier that opens the SubjectPublicKeyInfo of each accepted
# key, as `openssl req -pubkey` writes it: the key check compares bytes and
# parses nothing. Anything else (P-192, P-521, secp256k1, Ed448, RSA-PSS, DSA)
# is refused.
ACCEPTED_KEY_ALGORITHMS = {
    bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107"): "EC P-256",
    bytes.fromhex("301006072a8648ce3d020106052b81040022"): "EC P-384",
    bytes.fromhex("300506032b6570"): "Ed25519",
    bytes.fromhex("300d06092a864886f70d0101010500"): "RSA",
}

# OpenSSL 3.0 `req -verify` exits 0 even when the signature is bad, so the
# status line is the only signal; anything else counts as a failure.
VERIFY_OK_LINES = ("Certificate request self-signature verify OK", "verify OK")

PEM_PUBLIC_KEY_RE = re.compile(r"-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----")


class SigningLimited(Unavailable):
    """The tunnel has used up its MAX_CERTS_PER_HOUR; retry_after_s says when one more is due."""

    http_status = 429

    def __init__(self, retry_after_s):
        super().__init__("this tunnel had its certificates signed too often (MAX_CERTS_PER_HOUR); "
                         "retry in %d s" % retry_after_s)
        self.retry_after_s = retry_after_s


class Leaf(collections.namedtuple("Leaf", "pem serial not_after")):
    """A certificate the CA issued: its PEM text, its serial (hex, as in issued/) and its end."""


# ---- CSR checks -------------------------------------------------------------
# Whatever a CSR asks for, `openssl ca` as issue() calls it writes only the
# subject, extensions and dates given here, with the CSR's public key. So the
# server checks just the two things openssl does not: that the CSR is signed by
# its own key, and that the key is one we accept.

def check_csr(csr_pem, work):
    """Write a PEM CSR to work/req.pem and return its key's kind ("EC P-256", "RSA", ...);
    CertRefused (one line) unless it is one readable, self-signed request with an accepted key."""
    if not isinstance(csr_pem, str):
        raise CertRefused("CSR must be PEM text")
    if len(csr_pem) > CSR_MAX_BYTES:
        raise CertRefused("CSR is larger than %d bytes" % CSR_MAX_BYTES)
    if not csr_pem.isascii():
        raise CertRefused("CSR is not PEM: it contains non-ASCII characters")
    if csr_pem.count("-----BEGIN") != 1 or "-----BEGIN CERTIFICATE REQUEST-----" not in csr_pem:
        raise CertRefused("CSR must be exactly one PEM 'CERTIFICATE REQUEST' block")
    with open(os.path.join(work, "req.pem"), "w", encoding="ascii") as handle:
        handle.write(csr_pem)
    try:
        status = run_openssl(["req", "-in", "req.pem", "-verify", "-noout", "-pubkey", "-modulus",
                              "-out", "key.txt"], cwd=work, merge_stderr=True)
    except OpensslFailed as exc:
        raise CertRefused("CSR could not be read or verified by openssl: %s" % exc) from None
    if not any(line.strip() in VERIFY_OK_LINES for line in status.decode("utf-8", "replace").splitlines()):
        raise CertRefused("CSR signature does not verify: it was not signed by its own key")
    with open(os.path.join(work, "key.txt"), "r", encoding="ascii") as handle:
        return accepted_key(handle.read())


def accepted_key(key_text):
    """The kind of the public key `req -pubkey -modulus` printed, or CertRefused."""
    match = PEM_PUBLIC_KEY_RE.search(key_text)
    spki = base64.b64decode("".join(match.group(1).split())) if match else b""
    header = 2 + (spki[1] & 0x7F if len(spki) > 1 and spki[1] & 0x80 else 0)
    kind = next((name for algorithm, name in ACCEPTED_KEY_ALGORITHMS.items()
                 if spki[header:header + len(algorithm)] == algorithm), None)
    if kind is None:
        raise CertRefused("CSR key is not accepted; use EC P-256 or P-384, Ed25519, "
                          "or RSA of %d to %d bits" % (RSA_MIN_BITS, RSA_MAX_BITS))
    if kind == "RSA":
        modulus = re.search(r"^Modulus=([0-9A-F]+)$", key_text, re.MULTILINE)
        bits = int(modulus.group(1), 16).bit_length() if modulus else 0
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise CertRefused("CSR has a %d-bit RSA key; use %d to %d bits, or an EC P-256 key"
                              % (bits, RSA_MIN_BITS, RSA_MAX_BITS))
    return kind


# ---- certificates and files read back ---------------------------------------------

def cert_facts(pem):
    """(not_before, not_after, serial hex, authority key id hex or "", whether it is a CA) of
    the first certificate in pem, as `openssl x509` reads it; UsageError if it reads none."""
    try:
        out = run_openssl(["x509", "-noout", "-startdate", "-enddate", "-serial", "-ext",
                           "basicConstraints,authorityKeyIdentifier"],
                          input_bytes=pem.encode("ascii"))
    except OpensslFailed as exc:
        raise UsageError("not a readable certificate (%s)" % exc) from None
    text = out.decode("ascii", "replace")
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        start, end = (ssl.cert_time_to_seconds(fields[name].strip())
                      for name in ("notBefore", "notAfter"))
    except (KeyError, ValueError):
        raise UsageError("openssl printed no dates for the certificate") from None
    # keyid is the one colon-separated hex run (OpenSSL 1.1 prefixes "keyid:", 3.x not)
    aki = re.search(r"(?:[0-9A-Fa-f]{2}:){7,}[0-9A-Fa-f]{2}", text.split("Authority Key", 1)[-1])
    return (start, end, fields.get("serial", "").strip(),
            aki.group(0).replace(":", "") if aki else "", "CA:TRUE" in text)


def pem_certificates(text):
    """The PEM certificate blocks of text, in order."""
    return re.findall(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\n?",
                      text)


def read_text(path, what):
    """The ASCII text of path, or UsageError naming what it was meant to be."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read %s %s: %s" % (what, path, exc)) from None


# ---- the CA ---------------------------------------------------------------------

def openssl_time(epoch):
    """epoch as the YYYYMMDDHHMMSSZ form that `openssl ca -startdate/-enddate` takes."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(epoch))


def ca_config(san, key_usage, extended_key_usage):
    """A minimal `openssl ca` config for one end-entity certificate (inputs: validated names
    only): relative paths (run in a fresh directory), CN-only policy, no extension copied
    from the CSR, and the leaf's extensions in section pipe2me_leaf."""
    return "\n".join([
        "[ca]", "default_ca = pipe2me_ca",
        "[pipe2me_ca]", "database = index.txt", "serial = serial", "new_certs_dir = new",
        "default_md = default", "policy = pipe2me_policy", "copy_extensions = none",
        "unique_subject = no", "email_in_dn = no",
        "[pipe2me_policy]", "commonName = supplied",
        "[pipe2me_leaf]", "basicConstraints = critical,CA:FALSE",
        "keyUsage = critical," + key_usage, "extendedKeyUsage = " + extended_key_usage,
        "subjectAltName = " + san, "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid"]) + "\n"


class CertAuthority:
    """The server's CA, owning ca_dir: ca.key (0600), ca.pem and issued/<SERIAL>.pem (pods' leaves).
    An operator's CA (ca_cert_file, maybe followed by its chain, and ca_key_file) takes the
    place of the root, which is then never created. Call ensure() first; then sign() and
    issue_server_cert() are thread-safe."""

    def __init__(self, ca_dir, ca_cert_file=None, ca_key_file=None):
        if (ca_cert_file is None) != (ca_key_file is None):
            raise UsageError("an operator CA needs both a certificate file and a key file")
        self.ca_dir = os.path.abspath(ca_dir)
        self.issued_dir = os.path.join(self.ca_dir, "issued")
        self.supplied = ca_cert_file is not None
        self.cert_file = os.path.abspath(ca_cert_file or os.path.join(self.ca_dir, "ca.pem"))
        self.key_file = os.path.abspath(ca_key_file or os.path.join(self.ca_dir, "ca.key"))
        self.chain_pem = ""
        self.validity = (0, 0)

    def ensure(self, domain):
        """Create the root on first use, then load and check the CA (UsageError if its files
        are unusable). An existing root is kept even if domain changed: pods pinned it."""
        os.makedirs(self.ca_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.issued_dir, mode=0o700, exist_ok=True)
        if not self.supplied and not os.path.exists(self.cert_file):
            self.create_root(domain)
        blocks = pem_certificates(read_text(self.cert_file, "CA certificate"))
        try:
            start, end, _serial, _aki, is_ca = cert_facts(blocks[0] if blocks else "")
        except UsageError as exc:
            raise UsageError("CA certificate %s is unusable: %s" % (self.cert_file, exc)) from None
        if not is_ca:
            raise UsageError("CA certificate %s is unusable: it is no CA" % self.cert_file)
        if end <= time.time():
            raise UsageError("CA certificate %s has expired; supply a new CA" % self.cert_file)
        self.check_key_matches()
        self.chain_pem = "".join(block.rstrip("\n") + "\n" for block in blocks)
        self.validity = (start, end)

    def create_root(self, domain):
        """Make a new self-signed root in ca_dir; nothing is written unless all steps succeed."""
        if not is_hostname(domain):
            raise UsageError("cannot create a CA for %r: not a valid domain name" % domain)
        key = run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        # OpenSSL 3.0 does not read "-key -" from stdin, /dev/stdin does work.
        cert = run_openssl(["req", "-x509", "-new", "-key", "/dev/stdin", "-config", os.devnull,
                            "-subj", "/CN=pipe2me CA " + domain, "-days", str(CA_VALIDITY_DAYS),
                            "-addext", "basicConstraints=critical,CA:TRUE",
                            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                            "-addext", "subjectKeyIdentifier=hash"], input_bytes=key)
        # Key before cert: ensure() creates a root while ca.pem is missing, so a
        # crash between the two writes is repaired by the next start.
        write_atomic(self.key_file, key, 0o600)
        write_atomic(self.cert_file, cert, 0o644)

    def check_key_matches(self):
        """UsageError unless the CA key exists, is unencrypted and belongs to the CA cert."""
        if not os.path.exists(self.key_file):
            raise UsageError("CA key %s is missing: restore it (pods trust %s)"
                             % (self.key_file, self.cert_file))
        try:
            from_key = run_openssl(["pkey", "-in", self.key_file, "-passin", "pass:", "-pubout"])
            from_cert = run_openssl(["x509", "-in", self.cert_file, "-noout", "-pubkey"])
        except OpensslFailed as exc:
            raise UsageError("CA key or certificate is unusable: %s" % exc) from None
        if from_key.strip() != from_cert.strip():
            raise UsageError("CA key %s does not belong to CA certificate %s"
                             % (self.key_file, self.cert_file))

    def ca_pem(self):
        """What GET /cacert serves: the CA certificate followed by its chain, PEM."""
        return self.chain_pem

    def sign(self, csr_pem, fqdn, not_after_epoch):
        """Sign a pod's CSR (check_csr()) for fqdn; the Leaf, kept in issued/. Whatever the CSR
        asks, it gets CN=fqdn and SAN DNS:fqdn, CA:FALSE, EKU serverAuth+clientAuth, the CSR's
        key, and ends by not_after_epoch and by the CA's own end."""
        if not is_hostname(fqdn):
            raise CertRefused("cannot certify %s: not a valid host name" % printable(fqdn, 80))
        start, end = self.window(not_after_epoch)
        with tempfile.TemporaryDirectory(prefix="pipe2me-ca-") as work:
            kind = check_csr(csr_pem, work)
            key_usage = "digitalSignature,keyEncipherment" if kind == "RSA" else "digitalSignature"
            config = ca_config("DNS:" + fqdn, key_usage, "serverAuth,clientAuth")
            leaf = self.issue(work, fqdn, config, start, end)
        write_atomic(os.path.join(self.issued_dir, leaf.serial + ".pem"), leaf.pem.encode("ascii"))
        return leaf

    def forget(self, serials):
        """Remove the issued/ files of serials (None entries and missing files are skipped)."""
        for serial in serials:
            if serial and re.fullmatch(r"[0-9A-F]{1,64}", serial):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.issued_dir, serial + ".pem"))

    def window(self, not_after_epoch):
        """(start, end) for a new certificate, inside the CA's own validity."""
        now = int(time.time())
        start = max(now - LEAF_BACKDATE_S, self.validity[0])
        end = min(int(not_after_epoch), self.validity[1])
        if end <= now:
            raise CertRefused("the tunnel (or the CA) expires before a certificate could start")
        return start, end

    def issue(self, work, common_name, config, start, end):
        """The Leaf `openssl ca` makes of work/req.pem (work: a fresh directory) with ca_config()
        `config`, subject CN=common_name (a validated name) and dates start..end."""
        # 128 bits with the top one set: always 32 hex digits, 127 of them random.
        serial = "%032X" % (secrets.randbits(128) | (1 << 127))
        for name, text in (("index.txt", ""), ("serial", serial + "\n"),
                           ("ca.cnf", config)):
            with open(os.path.join(work, name), "w", encoding="ascii") as handle:
                handle.write(text)
        os.mkdir(os.path.join(work, "new"))
        run_openssl(["ca", "-config", "ca.cnf", "-extensions", "pipe2me_leaf", "-batch",
                     "-notext", "-in", "req.pem", "-out", "leaf.pem",
                     "-subj", "/CN=" + common_name, "-cert", self.cert_file,
                     "-keyfile", self.key_file, "-passin", "pass:",
                     "-startdate", openssl_time(start), "-enddate", openssl_time(end)], cwd=work)
        leaf = read_text(os.path.join(work, "leaf.pem"), "new certificate")
        if "-----BEGIN CERTIFICATE-----" not in leaf:   # openssl ca can exit 0 having written nothing
            raise Unavailable("openssl ca wrote no certificate for %s" % common_name)
        return Leaf(leaf, serial, end)

    def issue_server_cert(self, names, ips, key_path, cert_path, days):
        """Give the server a new key and TLS certificate (SAN: DNS names and IP addresses), valid
        `days` (capped by the CA), at key_path/cert_path; False if the pair there, from this CA
        for the same names, has more than SERVER_CERT_RENEW_BEFORE_S left. The record
        `<cert_path>.json` is written last, so a crash mid-way means "issue again"."""
        record = self.server_record(names, ips)
        if self.server_cert_reusable(record, key_path, cert_path):
            return False
        if os.path.exists(cert_path + ".json"):
            os.unlink(cert_path + ".json")
        key = run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        common_name = (record["names"] + record["ips"])[0]
        san = ",".join(["DNS:" + name for name in record["names"]] +
                       ["IP:" + address for address in record["ips"]])
        config = ca_config(san, "digitalSignature", "serverAuth")
        start, end = self.window(time.time() + days * 86400)
        with tempfile.TemporaryDirectory(prefix="pipe2me-ca-") as work:
            run_openssl(["req", "-new", "-key", "/dev/stdin", "-config", os.devnull, "-out",
                         "req.pem", "-subj", "/CN=" + common_name], input_bytes=key, cwd=work)
            leaf = self.issue(work, common_name, config, start, end)
        write_atomic(key_path, key, 0o600)
        write_atomic(cert_path, leaf.pem.encode("ascii"), 0o644)
        record["not_after"] = leaf.not_after
        write_atomic(cert_path + ".json", json.dumps(record, sort_keys=True).encode("ascii"))
        return True

    def server_record(self, names, ips):
        """The JSON record that identifies a server certificate: its SANs and the CA that signed it."""
        bad = [name for name in names if not is_hostname(name)]
        if bad:
            raise UsageError("server certificate name %s is not a valid host name"
                             % printable(bad[0], 80))
        try:
            addresses = [str(ipaddress.ip_address(address)) for address in ips]
        except ValueError as exc:
            raise UsageError("server certificate address: %s" % exc) from None
        if not names and not addresses:
            raise UsageError("a server certificate needs at least one name or address")
        ca_id = hashlib.sha256(self.chain_pem.encode("ascii")).hexdigest()
        return {"version": 1, "names": [name.lower() for name in names], "ips": addresses, "ca": ca_id}

    def server_cert_reusable(self, record, key_path, cert_path):
        """True if cert_path matches record and has life left, as its `.json` record says."""
        try:
            stored = read_json(cert_path + ".json")
            not_after = stored.pop("not_after")
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if stored != record or not os.path.exists(key_path) or not os.path.exists(cert_path):
            return False
        return isinstance(not_after, int) and not_after - time.time() > SERVER_CERT_RENEW_BEFORE_S


# ---- the certificates of each tunnel ----------------------------------------------

class CertBook:
    """Which certificates of a tunnel may open a session, and how often it may get one (a token
    bucket of MAX_CERTS_PER_HOUR). A record lists, oldest first, cert_sha256 (fingerprints) and
    cert_serials (their files in issued/): the newest certificate that has opened a session (or
    the first one), then those signed after it, CERT_KEEP in all. Only a listed certificate
    opens a session, and its first session drops every older one and its file: a certificate
    whose successor has been used never connects again, while a pod that renewed and crashed
    before writing its new certificate still connects with the old one. Files of deleted
    tunnels go at the next prune() (at start, at most hourly while signing). Thread-safe."""

    def __init__(self, store, ca, per_hour):
        self.store, self.ca, self.per_hour = store, ca, per_hour
        self.lock = threading.Lock()
        self.buckets = {}   # tunnel id -> (allowance, stamp)
        self.next_prune = 0.0

    def sign(self, record, csr_pem):
        """Charge the tunnel's quota (SigningLimited when spent), sign, and list the leaf.

        A refused CSR gives its charge back: the quota counts certificates."""
        self.take(record["id"])
        try:
            leaf = self.ca.sign(csr_pem, record["fqdn"], record["expires_at"])
        except CertRefused:
            self.take(record["id"], -1)
            raise
        fingerprint = sha256_hex(ssl.PEM_cert_to_DER_cert(leaf.pem))
        with self.lock:
            listed = listed_certs(self.store.get(record["id"]) or {})
            kept = listed[:1] + (listed[1:] + [(fingerprint, leaf.serial)])[1 - CERT_KEEP:]
            try:
                self.store.update(record["id"], cert_sha256=[fp for fp, _ in kept],
                                  cert_serials=[serial for _, serial in kept])
            except OSError:
                self.ca.forget([leaf.serial])
                raise
        self.ca.forget(serial for pair in listed + [(fingerprint, leaf.serial)]
                       if pair not in kept for serial in pair[1:])
        if time.monotonic() >= self.next_prune:
            self.prune()
        return leaf

    def take(self, tunnel_id, count=1):
        """Charge count signings to the tunnel (-1 gives one back), or SigningLimited."""
        if not self.per_hour:
            return
        now, rate = time.monotonic(), self.per_hour / 3600.0
        with self.lock:
            allowance, stamp = self.buckets.get(tunnel_id, (float(self.per_hour), now))
            allowance = min(float(self.per_hour), allowance + (now - stamp) * rate)
            if allowance < count:
                self.buckets[tunnel_id] = (allowance, now)
                raise SigningLimited(math.ceil((count - allowance) / rate))
            self.buckets[tunnel_id] = (min(float(self.per_hour), allowance - count), now)

    def admit(self, record, fingerprint):
        """True if the certificate may open a session for record; its first session
        drops the tunnel's older certificates."""
        with self.lock:
            listed = listed_certs(self.store.get(record["id"]) or {})
            fingerprints = [fp for fp, _ in listed]
            position = fingerprints.index(fingerprint) if fingerprint in fingerprints else -1
            if position > 0:
                kept = listed[position:]
                self.store.update(record["id"], cert_sha256=[fp for fp, _ in kept],
                                  cert_serials=[serial for _, serial in kept])
        if position > 0:
            self.ca.forget(serial for _, serial in listed[:position])
            log.info("older certificates retired tunnel=%s count=%d", record["id"], position)
        return position >= 0

    def prune(self):
        """Remove from issued/ every certificate no tunnel lists; buckets that refilled."""
        self.next_prune = time.monotonic() + CERT_PRUNE_INTERVAL_S
        keep = {serial for record in self.store.all() for _, serial in listed_certs(record)}
        self.ca.forget(name[:-4] for name in os.listdir(self.ca.issued_dir)
                       if name.endswith(".pem") and name[:-4] not in keep)
        with self.lock:
            now = time.monotonic()
            self.buckets = {key: (allowance, stamp) for key, (allowance, stamp)
                            in self.buckets.items()
                            if allowance + (now - stamp) * self.per_hour / 3600.0 < self.per_hour}


def listed_certs(record):
    """(fingerprint, serial) of the certificates a record lists, oldest first.
    Records written before cert_serials existed list fingerprints only."""
    fingerprints = record.get("cert_sha256", [])
    serials = record.get("cert_serials", [])[-len(fingerprints):] if fingerprints else []
    return list(zip(fingerprints, [None] * (len(fingerprints) - len(serials)) + serials))

# =====================================================================
# ACME — orders publicly trusted certificates (RFC 8555) for each pod's own
# CSR and for the server's name, renews them (ARI, RFC 9773, or at two
# thirds of the lifetime); owns STATE_DIR/acme; used by the API, the
# sessions (new chains go to live pods) and the wiring (challenge answers)
# =====================================================================

ACME_HTTP_TIMEOUT_S = 30
ACME_MAX_RESPONSE_BYTES = 1 << 20
ACME_BAD_NONCE_RETRIES = 10        # pebble rejects 5% of good nonces by default
ACME_POLL_ATTEMPTS = 60            # authorization / order status polls per order ...
ACME_POLL_FIRST_S = 0.125          # ... the first this far apart, doubling ...
ACME_POLL_DEFAULT_S = 1.0          # ... up to this, unless Retry-After says otherwise
ACME_POLL_MAX_S = 10.0
ACME_RETRY_MAX_S = 6 * 3600        # backoff ceiling after refusals
ACME_RENEW_FRACTION = 2.0 / 3.0    # without ARI: renew at two thirds of the lifetime
ACME_RATE_WINDOW_S = 7 * 86400     # Let's Encrypt: new certificates per registered domain per week
ACME_REKEY_INTERVAL_S = 3600       # a tunnel with a chain orders for a new key at most this often
ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"
ACME_SERVER_KEY = "server"         # the job of the server's own name (HTTPS_PORT)
# The fixed DER prefix of an EC P-256 SubjectPublicKeyInfo; the point follows.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")


class AcmeProblem(Unavailable):
    """The ACME CA refused: an RFC 7807 problem document (type, detail) and
    the seconds its Retry-After asked for (None if it gave none)."""

    def __init__(self, message, kind="", retry_after_s=None):
        super().__init__(message)
        self.kind, self.retry_after_s = kind, retry_after_s


def acme_problem(doc, where, retry_after_s=None):
    """The AcmeProblem, one line, of a problem document (RFC 7807) met `where`."""
    doc = doc if isinstance(doc, dict) else {}
    kind = str(doc.get("type", ""))
    kind = printable(kind[len(ACME_ERROR_PREFIX):] if kind.startswith(ACME_ERROR_PREFIX) else kind,
                     100)
    detail = printable(re.sub(r"[\x00-\x1f\x7f]+", " ", str(doc.get("detail", ""))))
    return AcmeProblem("ACME %s (%s): %s" % (kind or "error", where, detail or "no detail"),
                       kind, retry_after_s)


def b64url(data):
    """Bytes as base64url without padding (RFC 8555 §6.1)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def acme_json(obj):
    """Compact JSON bytes with sorted keys (JWS parts, JWK thumbprints)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def ecdsa_der_to_raw(der):
    """The 64-byte r||s of an ES256 JWS from openssl's DER ECDSA signature."""
    if len(der) < 8 or der[0] != 0x30:
        raise Unavailable("openssl gave an ECDSA signature that is not DER")
    pos, parts = 2, []
    for _ in range(2):
        if der[pos] != 0x02:
            raise Unavailable("openssl gave an ECDSA signature that is not DER")
        length = der[pos + 1]
        parts.append(int.from_bytes(der[pos + 2:pos + 2 + length], "big"))
        pos += 2 + length
    return b"".join(part.to_bytes(32, "big") for part in parts)


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After header (delta seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):   # not isdigit(): "²" is a digit int() refuses
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0, int(when - (time.time() if now is None else now)))


def parse_rfc3339(text):
    """Epoch seconds of an RFC 3339 time such as ARI's suggestedWindow; ValueError if bad."""
    text = re.sub(r"(:\d\d)\.\d+", r"\1", str(text).strip().upper())  # Go's 9 digits: %f takes 6
    return int(datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp())


def ari_cert_id(serial_hex, aki_hex):
    """The ARI certificate identifier (RFC 9773 §4.1): AKI keyIdentifier '.' serial DER bytes."""
    serial = bytes.fromhex(serial_hex if len(serial_hex) % 2 == 0 else "0" + serial_hex)
    if serial and serial[0] & 0x80:
        serial = b"\0" + serial
    return "%s.%s" % (b64url(bytes.fromhex(aki_hex)), b64url(serial))


class AcmeClient:
    """One ACME account at one directory, driven by blocking HTTPS calls from one thread; its
    EC P-256 key is made in key_path on first use and signs every JWS (ES256, `openssl dgst`)."""

    def __init__(self, directory_url, key_path, email="", ca_bundle=""):
        self.directory_url, self.key_path, self.email = directory_url, key_path, email
        self.context = ssl.create_default_context(cafile=ca_bundle or None)
        self.urls = self.nonce = self.kid = self.jwk = None

    def reset(self):
        """Forget the directory, nonce and account URL (after a failure: the CA may have changed)."""
        self.urls = self.nonce = self.kid = None

    # -- keys and signatures ------------------------------------------
    def load_key(self):
        """Make the account key on first use; read its public point into the JWK."""
        if not os.path.exists(self.key_path):
            key = run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
            write_atomic(self.key_path, key, 0o600)
        spki = run_openssl(["pkey", "-in", self.key_path, "-pubout", "-outform", "DER"])
        if not spki.startswith(P256_SPKI_PREFIX) or len(spki) != len(P256_SPKI_PREFIX) + 65:
            raise UsageError("ACME account key %s is not an EC P-256 key" % self.key_path)
        point = spki[len(P256_SPKI_PREFIX) + 1:]
        self.jwk = {"crv": "P-256", "kty": "EC", "x": b64url(point[:32]), "y": b64url(point[32:])}

    def key_authorization(self, token):
        """RFC 8555 §8.1: the token and the account key's JWK thumbprint (RFC 7638)."""
        return "%s.%s" % (token, b64url(hashlib.sha256(acme_json(self.jwk)).digest()))

    def jws(self, url, payload):
        """The flattened JWS (ES256) of payload for url: kid once registered, jwk before."""
        protected = dict({"kid": self.kid} if self.kid else {"jwk": self.jwk},
                         alg="ES256", nonce=self.nonce, url=url)
        body64 = "" if payload is None else b64url(acme_json(payload))
        signing_input = "%s.%s" % (b64url(acme_json(protected)), body64)
        der = run_openssl(["dgst", "-sha256", "-sign", self.key_path],
                          input_bytes=signing_input.encode("ascii"))
        return acme_json({"protected": signing_input.split(".")[0], "payload": body64,
                          "signature": b64url(ecdsa_der_to_raw(der))})

    # -- HTTP ---------------------------------------------------------
    def request(self, method, url, body=None):
        """(status, headers, body bytes) of one HTTPS exchange; Unavailable if unreachable."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise UsageError("ACME URL %s is not https" % url[:200])
        from urllib.request import ProxyHandler, Request  # here: only ACME users need it (RSS)
        request = Request(url, data=body, method=method, headers={
            "User-Agent": "pipe2me", "Content-Type": "application/jose+json"})
        try:
            status, headers, data = http_exchange(request, ACME_HTTP_TIMEOUT_S,
                                                  ACME_MAX_RESPONSE_BYTES, (ProxyHandler({}),),
                                                  self.context, redirects=False)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc  # urllib's URLError wraps it
            raise Unavailable("ACME server %s unreachable: %s" % (parts.netloc, reason)) from None
        self.nonce = headers.get("Replay-Nonce") or self.nonce
        return status, headers, data

    def directory(self):
        """The CA's directory object (fetched once, forgotten by reset())."""
        if self.urls is None:
            status, _headers, data = self.request("GET", self.directory_url)
            urls = json.loads(data) if status == 200 else None
            if not isinstance(urls, dict) or "newOrder" not in urls:
                raise Unavailable("ACME directory %s answered %d, not a directory"
                                  % (self.directory_url, status))
            self.urls = urls
        return self.urls

    def post(self, url, payload):
        """POST a JWS (payload None = POST-as-GET); (status, headers, body) of a 2xx answer."""
        for _ in range(ACME_BAD_NONCE_RETRIES):
            if not self.nonce:
                self.request("HEAD", self.directory()["newNonce"])
            status, headers, data = self.request("POST", url, self.jws(url, payload))
            if status < 400:
                return status, headers, data
            problem = self.problem(status, headers, data)
            if problem.kind != "badNonce":
                raise problem
            log.debug("acme bad nonce, retrying url=%s", url)
        raise AcmeProblem("ACME server rejected %d nonces in a row" % ACME_BAD_NONCE_RETRIES, "badNonce")

    @staticmethod
    def problem(status, headers, data):
        """The AcmeProblem of an error answer (RFC 8555 §6.7)."""
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {}
        return acme_problem(doc, "HTTP %d" % status,
                            parse_retry_after(headers.get("Retry-After")))

    def get_json(self, url):
        """POST-as-GET url; (JSON object, headers)."""
        status, headers, data = self.post(url, None)
        try:
            return json.loads(data), headers
        except ValueError:
            raise Unavailable("ACME server answered %s with no JSON" % url[:200]) from None

    # -- account, order, ARI --------------------------------------------
    def ensure_account(self):
        """Register the account (or find the existing one for this key) once."""
        if self.kid:
            return
        self.load_key()
        payload = {"termsOfServiceAgreed": True}
        if self.email:
            payload["contact"] = ["mailto:" + self.email]
        _status, headers, _data = self.post(self.directory()["newAccount"], payload)
        self.kid = headers.get("Location")
        if not self.kid:
            raise Unavailable("ACME server gave the account no URL")

    def renewal_window(self, serial_hex, aki_hex):
        """(start, end, retry_after_s) of ARI's suggested window, or None without ARI."""
        base = self.directory().get("renewalInfo")
        if not base or not aki_hex:
            return None
        status, headers, data = self.request("GET", base.rstrip("/") + "/" + ari_cert_id(serial_hex, aki_hex))
        try:
            window = json.loads(data)["suggestedWindow"]
            start, end = parse_rfc3339(window["start"]), parse_rfc3339(window["end"])
        except (ValueError, KeyError, TypeError):
            log.info("acme renewal info unusable status=%d", status)
            return None
        return start, max(start, end), parse_retry_after(headers.get("Retry-After"))


def acme_order(client, fqdn, csr_der, challenger, renews=None):
    """Order, validate and download a certificate for fqdn; the chain PEM (leaf first).
    `challenger` is a DnsTxtChallenger or an HttpTokenChallenger; `renews` the (serial,
    AKI) of the certificate this one replaces, named to a CA with ARI (RFC 9773 §5)."""
    client.ensure_account()
    payload = {"identifiers": [{"type": "dns", "value": fqdn}]}
    if renews and all(renews) and "renewalInfo" in client.directory():
        payload["replaces"] = ari_cert_id(*renews)
    _status, headers, data = client.post(client.directory()["newOrder"], payload)
    order, order_url = json.loads(data), headers.get("Location")
    for authz_url in order.get("authorizations", []):
        acme_authorize(client, fqdn, authz_url, challenger)
    order = acme_poll(client, order_url, ("ready", "valid"), "order")
    if order["status"] == "ready":
        client.post(order["finalize"], {"csr": b64url(csr_der)})
        order = acme_poll(client, order_url, ("valid",), "order")
    _status, _headers, data = client.post(order["certificate"], None)
    return data.decode("ascii", "replace")


def acme_authorize(client, fqdn, authz_url, challenger):
    """Answer one authorization with the challenger's kind; returns when it is valid."""
    authz, _headers = client.get_json(authz_url)
    if authz.get("status") == "valid":
        return
    offered = [c for c in authz.get("challenges", []) if c.get("type") == challenger.kind]
    if not offered:
        raise AcmeProblem("ACME server offers no %s challenge for %s" % (challenger.kind, fqdn),
                          "unsupportedChallenge")
    challenge = offered[0]
    token = str(challenge.get("token", ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", token):
        raise AcmeProblem("ACME challenge token is malformed", "malformed")
    challenger.publish(fqdn, token, client.key_authorization(token))
    try:
        client.post(challenge["url"], {})
        acme_poll(client, authz_url, ("valid",), "authorization")
    finally:
        challenger.withdraw(fqdn, token)


def acme_poll(client, url, wanted, what):
    """POST-as-GET url until its status is one of `wanted` (1/8 s apart, doubling); AcmeProblem if invalid."""
    for attempt in range(ACME_POLL_ATTEMPTS):
        obj, headers = client.get_json(url)
        status = obj.get("status")
        if status in wanted:
            return obj
        if status not in ("pending", "processing", "ready"):
            raise acme_failure(obj, what)
        delay = (parse_retry_after(headers.get("Retry-After"))
                 or min(ACME_POLL_DEFAULT_S, ACME_POLL_FIRST_S * 2 ** attempt))
        time.sleep(min(ACME_POLL_MAX_S, delay))
    raise Unavailable("ACME %s still not %s after %d polls" % (what, "/".join(wanted), ACME_POLL_ATTEMPTS))


def acme_failure(obj, what):
    """An AcmeProblem from an invalid order or authorization (the challenge's error if any)."""
    errors = [obj.get("error")] + [c.get("error") for c in obj.get("challenges", [])
                                   if isinstance(c, dict)]
    return acme_problem(next((e for e in errors if isinstance(e, dict)), {}),
                        "%s %s" % (what, obj.get("status")))


class DnsTxtChallenger:
    """DNS-01: the TXT record `_acme-challenge.<fqdn>` through set_txt(name, values)
    (the built-in DNS or dnsimple, given by the wiring)."""
    kind = "dns-01"

    def __init__(self, set_txt):
        self.set_txt = set_txt

    def publish(self, fqdn, token, key_authorization):
        """Publish the TXT value of the key authorization (RFC 8555 §8.4)."""
        value = b64url(hashlib.sha256(key_authorization.encode("ascii")).digest())
        self.set_txt("_acme-challenge." + fqdn, [value])

    def withdraw(self, fqdn, token):
        """Remove the challenge's TXT record."""
        self.set_txt("_acme-challenge." + fqdn, [])


class HttpTokenChallenger:
    """HTTP-01: key authorizations the HTTP front serves at
    /.well-known/acme-challenge/<token> (answer(), from any thread)."""
    kind = "http-01"

    def __init__(self):
        self.tokens = {}
        self.lock = threading.Lock()

    def publish(self, fqdn, token, key_authorization):
        """Serve key_authorization for token from now on."""
        with self.lock:
            self.tokens[token] = key_authorization.encode("ascii")

    def withdraw(self, fqdn, token):
        """Stop serving the token (404 from then on)."""
        with self.lock:
            self.tokens.pop(token, None)

    def answer(self, token):
        """The body for GET /.well-known/acme-challenge/<token>, or None (404)."""
        with self.lock:
            return self.tokens.get(token)


class AcmeOrders:
    """The ACME jobs, one per tunnel (key: its id) and one for the server's name (ACME_SERVER_KEY),
    each in STATE_DIR/acme/certs/<key>.json (CSR, state pending/queued/valid/failed, reason,
    next try, chain), run one at a time by a worker thread so no order blocks the loop.
    New certificates (not renewals) are counted in STATE_DIR/acme/issued.json, per token too:
    past ACME_NEW_CERTS_PER_WEEK, or a token's ACME_NEW_CERTS_PER_TOKEN_PER_WEEK, an order
    waits (queued) while other tokens' orders go on: no tenant spends the week's certificates.
    alive(key): is the job still wanted; on_change(key), in the worker, after each change.
    request(), status() and forget() are thread-safe."""

    def __init__(self, settings, client, challenger, alive, on_change):
        self.settings, self.client, self.challenger = settings, client, challenger
        self.alive, self.on_change = alive, on_change
        self.dir = os.path.join(settings.state_dir, "acme")
        self.jobs = {}
        self.cond = threading.Condition()
        self.stopping = False

    @staticmethod
    def job_path(state_dir, key):
        """Where the job of key is stored."""
        return os.path.join(state_dir, "acme", "certs", key + ".json")

    def load(self):
        """Read the stored jobs (an unreadable one is logged and skipped)."""
        os.makedirs(os.path.join(self.dir, "certs"), mode=0o700, exist_ok=True)
        for name in os.listdir(os.path.join(self.dir, "certs")):
            if name.endswith(".json"):
                try:
                    job = read_json(os.path.join(self.dir, "certs", name))
                except (OSError, ValueError) as exc:
                    log.error("acme job unreadable file=%s error=%s", name, exc)
                    continue
                self.jobs[job["key"]] = job

    def start(self):
        """Start the worker thread."""
        threading.Thread(target=self.run, name="acme", daemon=True).start()

    def stop(self):
        """Let the worker end after the order it is running (if any)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # -- what other threads call ------------------------------------------
    def request(self, key, fqdn, csr_pem, token_sha256=None):
        """Make sure `key` gets a certificate for fqdn from this CSR, counted in the share of
        the tunnel's token (none for the server's name); a CSR for the same key (a renewed
        server-CA certificate) keeps the job and its chain."""
        with self.cond:
            job = self.jobs.get(key)
            known = job["csr"] if job is not None and job["fqdn"] == fqdn else None
        if known is not None and (known == csr_pem or same_public_key(known, csr_pem)):
            return
        with self.cond:
            job = dict(self.jobs.get(key) or {}, version=1, key=key, fqdn=fqdn, csr=csr_pem,
                       state="pending", reason=None, next_try_at=int(time.time()), attempts=0,
                       token_sha256=token_sha256)
            self.hold_rekey(job)
            self.jobs[key] = job
            self.save(job)
            self.cond.notify_all()
        log.info("acme order wanted key=%s fqdn=%s", key, fqdn)

    @staticmethod
    def hold_rekey(job):
        """A new key for a name with a chain waits ACME_REKEY_INTERVAL_S after its last order:
        every tenant shares the CA account's orders (Let's Encrypt: 300 per 3 hours), and
        renewals of the same name are not held by the weekly limit."""
        if not job.get("chain"):
            return
        ready_at = job.get("ordered_at", 0) + ACME_REKEY_INTERVAL_S
        if ready_at > job["next_try_at"]:
            job.update(state="queued", next_try_at=int(ready_at),
                       reason="a new key for this name is ordered at most once an hour")

    def status(self, key):
        """What the API, `tunnels show` and the pod see of a job (chain included), or None."""
        with self.cond:
            job = self.jobs.get(key)
            return None if job is None else acme_view(job)

    def forget(self, key):
        """Drop the job of key and its file."""
        with self.cond:
            if self.jobs.pop(key, None) is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.job_path(self.settings.state_dir, key))

    def save(self, job):
        """Write the job's file atomically (mode 0600: it names the token's hash)."""
        write_json(self.job_path(self.settings.state_dir, job["key"]), job, 0o600)

    # -- the worker -------------------------------------------------------
    def run(self):
        """The worker: run each job when it is due, one at a time, until stop()."""
        while True:
            with self.cond:
                job = self.next_due()
            if job is None:
                return
            self.process(job)

    def next_due(self):
        """A copy of the next job once it is due (the caller holds cond), or None after stop()."""
        while not self.stopping:
            now = time.time()
            due = [j for j in self.jobs.values() if self.due_at(j) is not None]
            job = min(due, key=self.due_at, default=None)
            if job is not None and self.due_at(job) <= now:
                return dict(job)
            self.cond.wait(max(0.05, 60.0 if job is None else min(60.0, self.due_at(job) - now)))
        return None

    @staticmethod
    def due_at(job):
        """When the job wants the worker next (renewal or retry), or None."""
        if job["state"] == "valid":
            return job.get("renew_at")
        return job.get("next_try_at")

    def process(self, job):
        """One turn of a job: dropped, queued (weekly limit, token's share), or ordered."""
        key = job["key"]
        if not self.alive(key):
            log.info("acme job dropped, tunnel gone key=%s", key)
            return self.forget(key)
        renewal = bool(job.get("chain")) and job.get("chain_fqdn") == job["fqdn"]
        hold = None if renewal else self.new_certificate_hold(job.get("token_sha256"))
        if hold is not None:
            return self.finish(job, state="queued", next_try_at=hold[0], reason=hold[1])
        log.info("acme order started key=%s fqdn=%s renewal=%s", key, job["fqdn"], renewal)
        self.finish(job, tell=False, ordered_at=int(time.time()))
        try:
            self.succeeded(job, self.order(job, renewal), renewal)
        except Pipe2meError as exc:
            self.failed(job, exc)

    def order(self, job, renewal):
        """The new chain for a job; Pipe2meError (AcmeProblem from the CA) otherwise."""
        csr_der = run_openssl(["req", "-outform", "DER"], input_bytes=job["csr"].encode("ascii"))
        renews = (job.get("serial"), job.get("aki")) if renewal else None
        try:
            chain = acme_order(self.client, job["fqdn"], csr_der, self.challenger, renews)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Unavailable("ACME server answered unexpectedly: %s" % exc) from None
        certs = pem_certificates(chain)
        if not certs or not same_public_key(job["csr"], certs[0], "x509"):
            raise Unavailable("ACME server sent no certificate for the CSR's key")
        return "".join(c if c.endswith("\n") else c + "\n" for c in certs)

    def succeeded(self, job, chain, renewal):
        """Keep the new chain and schedule its renewal."""
        start, end, serial, aki, _ca = cert_facts(chain)
        renew_at = self.renew_time(start, end, serial, aki)
        if not renewal:
            self.count_new_certificate(job.get("token_sha256"))
        log.info("acme certificate issued key=%s fqdn=%s not_after=%d renew_at=%d",
                 job["key"], job["fqdn"], end, renew_at)
        self.finish(job, state="valid", chain=chain, chain_fqdn=job["fqdn"], not_before=start,
                    not_after=end, serial=serial, aki=aki, renew_at=renew_at, attempts=0,
                    reason=None, next_try_at=None)

    def renew_time(self, start, end, serial, aki):
        """When to renew: a random moment in ARI's window if the CA gives one, else at 2/3."""
        try:
            window = self.client.renewal_window(serial, aki)
        except Pipe2meError as exc:
            log.info("acme renewal info unavailable reason=%s", exc)
            window = None
        if window is not None:
            return int(window[0] + secrets.randbelow(max(1, int(window[1] - window[0]))))
        return int(start + (end - start) * ACME_RENEW_FRACTION)

    def failed(self, job, exc):
        """Keep the reason and schedule the next try (backoff, at least the CA's Retry-After)."""
        self.client.reset()
        attempts = job.get("attempts", 0) + 1
        backoff = min(ACME_RETRY_MAX_S, self.settings.acme_retry * 2 ** min(attempts - 1, 20))
        backoff = max(backoff, getattr(exc, "retry_after_s", None) or 0)
        jitter = (secrets.randbelow(2000) - 1000) / 10000.0   # +-10 %: retries spread out
        next_try = int(time.time() + backoff * (1 + jitter))
        log.warning("acme order failed key=%s fqdn=%s attempt=%d retry_in=%ds reason=%s",
                    job["key"], job["fqdn"], attempts, next_try - int(time.time()), exc)
        self.finish(job, state="failed", reason=str(exc)[:400], next_try_at=next_try,
                    attempts=attempts)

    def finish(self, job, tell=True, **changes):
        """Store the job's new state, unless it was forgotten or asked anew meanwhile;
        with `tell`, say so to the pod or the API."""
        with self.cond:
            current = self.jobs.get(job["key"])
            if current is None or current["csr"] != job["csr"]:
                return
            current.update(changes)
            self.save(current)
        if tell:
            self.on_change(job["key"])

    # -- the CA's weekly limit on new certificates, and each token's share --
    def issued_path(self):
        """The file of the new certificates' times (the weekly limit, the shares)."""
        return os.path.join(self.dir, "issued.json")

    def recent_new_certificates(self, now):
        """Times of the new certificates of the last seven days, oldest first:
        (all, {token_sha256: the token's}); a file from before the shares has none."""
        try:
            data = read_json(self.issued_path())
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        by_token = data.get("by_token") if isinstance(data.get("by_token"), dict) else {}
        by_token = {token: recent_times(times, now) for token, times in by_token.items()}
        return recent_times(data.get("issued"), now), {t: v for t, v in by_token.items() if v}

    def new_certificate_hold(self, token_sha256):
        """(next try, reason) while the weekly limit or the token's share holds a new one back."""
        now = time.time()
        issued, by_token = self.recent_new_certificates(now)
        limit = self.settings.acme_new_certs_per_week
        share = self.settings.acme_new_certs_per_token_per_week
        mine = by_token.get(token_sha256, []) if token_sha256 else []
        holds = []
        if limit and len(issued) >= limit:
            holds.append((issued[-limit] + ACME_RATE_WINDOW_S, "waiting for the CA's limit of "
                          "%d new certificates a week" % limit))
        if share and len(mine) >= share:
            frees_at = mine[-share] + ACME_RATE_WINDOW_S
            holds.append((frees_at, "this token has used its share of %d new certificates a week "
                          "(ACME_NEW_CERTS_PER_TOKEN_PER_WEEK); the next frees up at %s"
                          % (share, iso_time(frees_at))))
        if not holds:
            return None
        frees_at, reason = max(holds)
        return int(max(now + 1, frees_at)), reason

    def count_new_certificate(self, token_sha256):
        """Record one new certificate now (in the token's share too, if it has one)."""
        now = int(time.time())
        issued, by_token = self.recent_new_certificates(now)
        if token_sha256:
            by_token[token_sha256] = by_token.get(token_sha256, []) + [now]
        write_json(self.issued_path(), {"version": 1, "issued": issued + [now],
                                        "by_token": by_token}, 0o600)


def recent_times(times, now):
    """The epoch times of a stored list within the last seven days, sorted."""
    times = times if isinstance(times, list) else []
    return sorted(t for t in times if isinstance(t, (int, float)) and t > now - ACME_RATE_WINDOW_S)


def same_public_key(csr_pem, other_pem, other_kind="req"):
    """True when a CSR and another CSR (or, with other_kind "x509", a certificate), PEM,
    carry the same public key."""
    try:
        keys = [run_openssl([kind, "-noout", "-pubkey"], input_bytes=pem.encode("ascii")).strip()
                for kind, pem in (("req", csr_pem), (other_kind, other_pem))]
    except (Pipe2meError, UnicodeEncodeError):
        return False
    return keys[0] == keys[1]


def acme_view(job):
    """The public part of a job: state, reason, next try, dates, the chain."""
    view = {key: job.get(key) for key in ("state", "reason", "next_try_at", "not_after", "renew_at")}
    if job.get("chain") and job.get("not_after", 0) > time.time():
        view["chain"] = job["chain"]
    return view


def read_acme_view(state_dir, key):
    """acme_view of a stored job (for `tunnels show` while the server runs elsewhere), or None."""
    try:
        return acme_view(read_json(AcmeOrders.job_path(state_dir, key)))
    except (OSError, ValueError, KeyError):
        return None

# =====================================================================
# API — the HTTP API on the bare domain (JSON, or shell format with
# ?format=shell); ApiServer runs it in threads for the connections the
# fronts hand over
# =====================================================================

class BadTokenLimiter:
    """Counts failed token uses per source (IPv4 address, IPv6 /64) and for
    all sources together, over the last BAD_TOKEN_WINDOW_S; thread-safe.
    Past either limit every token use gets 429 until the window has moved
    on: guesses spread over many addresses are limited too (at the price
    that, during such a flood, valid tokens wait as well)."""

    def __init__(self):
        self.failures = collections.OrderedDict()    # source -> deque of times
        self.everyone = collections.deque(maxlen=BAD_TOKEN_GLOBAL_LIMIT)
        self.lock = threading.Lock()

    def blocked(self, address):
        """Why this address may not try a token now ("" if it may)."""
        now, source = time.monotonic(), source_prefix(address, 32, 64)
        with self.lock:
            recent = self.failures.get(source, ())
            if sum(now - t < BAD_TOKEN_WINDOW_S for t in recent) >= BAD_TOKEN_LIMIT:
                return "too many invalid tokens from %s; wait a minute" % source
            if (len(self.everyone) >= BAD_TOKEN_GLOBAL_LIMIT
                    and now - self.everyone[0] < BAD_TOKEN_WINDOW_S):
                return "too many invalid tokens from everywhere; wait a minute"
            return ""

    def record(self, address):
        """Count one failed token use from `address` (the table is bounded)."""
        now, source = time.monotonic(), source_prefix(address, 32, 64)
        with self.lock:
            self.failures.setdefault(source, collections.deque(maxlen=BAD_TOKEN_LIMIT)).append(now)
            self.failures.move_to_end(source)
            self.everyone.append(now)
            while len(self.failures) > 10000:  # bounded: forget the least recent sources
                self.failures.popitem(last=False)


class Api:
    """What the request handlers share; one per server."""

    def __init__(self, settings, store, ca):
        self.settings, self.store, self.ca = settings, store, ca
        self.certs = CertBook(store, ca, settings.max_certs_per_hour)
        self.tokens = {}
        self.limiter = BadTokenLimiter()
        self.metrics = lambda tenants: ""     # set by the wiring: Server.metrics_text
        self.status_lines = lambda tenants: []
        self.reachability = None  # (record, client address, body) -> dict; set by the wiring
        self.acme = None          # AcmeOrders when ACME_DIRECTORY is set; set by the wiring
        self.presence = None      # Presence (who is connected); set by the wiring

    def token_options(self, token, address):
        """The options of a valid token; 429 while too many invalid ones came
        from the address's source or from everywhere, Rejected (and counted)
        for an invalid one."""
        refusal = self.limiter.blocked(address)
        if refusal:
            raise Unavailable(refusal, http_status=429)
        options = self.tokens.get(token)
        if options is None:
            self.limiter.record(address)
            raise Rejected("invalid token")
        return options

    def tunnel_for(self, tunnel_id, secret):
        """The record if the secret matches; NotFound or Rejected (401) otherwise."""
        record = self.store.get(tunnel_id) if TUNNEL_ID.fullmatch(tunnel_id) else None
        if record is None:
            raise NotFound("unknown tunnel %s" % tunnel_id[:40])
        if not secret or not secrets.compare_digest(sha256_hex(secret), record["secret_sha256"]):
            raise Rejected("wrong or missing tunnel secret (Authorization: Bearer ...)",
                           http_status=401)
        return record


# A state file that cannot be written (disk full, read-only, out of descriptors)
# is the operator's problem: the client gets a clear 5xx, not a dropped connection.
STATE_WRITE_STATUS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EROFS: 503,
                      errno.EACCES: 503, errno.EPERM: 503, errno.EMFILE: 503,
                      errno.ENFILE: 503, errno.EIO: 503}


def state_write_failed(exc):
    """(status, JSON body) for an OSError of a state write; None for other OSErrors."""
    status = STATE_WRITE_STATUS.get(exc.errno)
    if status is None:
        return None
    log.error("state write failed file=%s error=%s", exc.filename, exc.strerror)
    return status, {"error": "cannot write state on the server: %s; retry later" % exc.strerror}


def check_protocols(protocols):
    """The requested protocols as a list (a comma string is split); UsageError if unknown."""
    if isinstance(protocols, str):
        protocols = [p for p in re.split(r"[\s,]+", protocols) if p]
    if not isinstance(protocols, list) or not protocols:
        raise UsageError("protocols must be a non-empty list")
    unknown = [p for p in protocols if p not in SERVICE_PROTOCOLS]
    if unknown:
        raise UsageError("unknown protocol %s (known: %s)"
                         % (str(unknown[0])[:40], ", ".join(SERVICE_PROTOCOLS)))
    return protocols


def check_settings(body):
    """The tunnel settings a pod may choose, from a request body:
    proxy_protocol "v1", "v2" or "off" (stored as "")."""
    value = body.get("proxy_protocol")
    if value is None:
        return {}
    if value not in PROXY_PROTOCOL_CHOICES:
        raise UsageError("proxy_protocol must be one of %s" % ", ".join(PROXY_PROTOCOL_CHOICES))
    return {"proxy_protocol": "" if value == "off" else value}


def field(body, *names):
    """The first non-empty string among body[name] for names, or "". JSON can
    carry any type: anything but a string (or null) is a 400."""
    for name in names:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError("%s must be a string" % name)
        if value:
            return value
    return ""


def in_networks(address, networks):
    """Whether an address (a string; IPv4-mapped counts as IPv4) is in one of `networks`."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return any(ip in network for network in networks)


ROUTES = [
    ("GET", r"/", "page_status"),
    ("GET", r"/config", "page_config"),
    ("GET", r"/cacert", "page_cacert"),
    ("GET", r"/metrics", "page_metrics"),
    ("POST", r"/tunnels", "post_tunnels"),
    ("GET", r"/tunnels/(?P<id>[^/]+)", "get_tunnel"),
    ("DELETE", r"/tunnels/(?P<id>[^/]+)", "delete_tunnel"),
    ("PATCH", r"/tunnels/(?P<id>[^/]+)", "patch_tunnel"),
    ("GET", r"/tunnels/(?P<id>[^/]+)/verify", "get_verify"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/cert", "post_cert"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/extend", "post_extend"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/check", "post_check"),
]


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """One API request per connection (HTTP/1.0). `server` is the Api object.

    Every answer is JSON (or shell format); failures are 4xx with
    {"error": ...}; nothing here raises past handle()."""

    server_version = "pipe2me"
    protocol_version = "HTTP/1.0"
    timeout = 10
    query = {}  # until dispatch() parses the URL: a bad request line is answered before

    def version_string(self):
        """The Server header: the product, no versions."""
        return self.server_version

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self):
        """Every method: route the request and answer it; a Pipe2meError gives its status."""
        try:
            url = urllib.parse.urlsplit(self.path)
        except ValueError:  # e.g. "http://[::1" as the target
            return self.reply(400, {"error": "malformed request target"})
        self.query = urllib.parse.parse_qs(url.query)
        try:
            self.check_request()
            handler, params = self.route(self.command, url.path.rstrip("/") or "/")
            status, body = handler(**params)
        except Pipe2meError as exc:
            status, body = exc.http_status, dict(exc.details, error=str(exc))
        except OSError as exc:
            answer = state_write_failed(exc)
            if answer is None:
                raise  # the client's socket failed: nobody to answer
            status, body = answer
        self.reply(status, body)

    def route(self, method, path):
        """The endpoint method and its URL parameters; NotFound or 405."""
        allowed = []
        for verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and verb == method:
                return getattr(self, name), match.groupdict()
            if match:
                allowed.append(verb)
        if allowed:
            raise UsageError("method %s not allowed on %s" % (method[:20], path[:80]),
                             http_status=405)
        raise NotFound("no such endpoint %s" % path[:80])

    def check_request(self):
        """Refuse what HTTP/1.x does not allow before any endpoint runs."""
        if self.request_version == "HTTP/0.9":
            raise UsageError("HTTP/0.9 requests are not supported; send HTTP/1.0 or 1.1")
        if self.request_version == "HTTP/1.1" and "Host" not in self.headers:
            raise UsageError("an HTTP/1.1 request needs a Host header")

    # -- request and answer -------------------------------------------
    def body(self):
        """The request body as a dict (JSON or form), within API_MAX_BODY_BYTES."""
        if "Transfer-Encoding" in self.headers:
            raise UsageError("send the body with a Content-Length (no Transfer-Encoding)",
                             http_status=411)
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            return {}
        length = lengths.pop().strip() if len(lengths) == 1 else "conflicting"
        if not re.fullmatch(r"[0-9]+", length):
            raise UsageError("bad Content-Length")
        if len(length) > 9 or int(length) > API_MAX_BODY_BYTES:
            raise UsageError("request body over %d bytes" % API_MAX_BODY_BYTES, http_status=413)
        raw = self.rfile.read(int(length))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("request body is not UTF-8") from None
        if "json" in self.headers.get("Content-Type", "") or text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
                json.dumps(data, ensure_ascii=False).encode()  # a lone "\\ud800" is no text
            except (ValueError, RecursionError):
                raise UsageError("request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise UsageError("request body must be a JSON object")
            return data
        return {k: v[-1] for k, v in urllib.parse.parse_qs(text).items()}

    def secret(self, body=None):
        """The tunnel secret: Authorization: Bearer, else the body's or the query's `secret`."""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        return field(body or {}, "secret") or (self.query.get("secret") or [""])[-1]

    def wants_shell(self):
        """Whether the client asked for the shell format (?format=shell or Accept)."""
        headers = getattr(self, "headers", None) or {}  # none yet after a bad request line
        return self.query.get("format", [""])[-1] == "shell" or \
            "text/x-shellscript" in headers.get("Accept", "")

    def reply(self, status, body):
        """Send status and body: str as text, else JSON or shell format."""
        if self.request_version == "HTTP/0.9":  # it has no status line; we refuse it anyway
            self.request_version = "HTTP/1.0"
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        elif self.wants_shell():
            data, ctype = shell_format(body).encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = (json.dumps(body) + "\n").encode(), "application/json"
        self.send_response(status)
        if status == 429 and isinstance(body, dict) and "retry_after_s" in body:
            self.send_header("Retry-After", str(int(body["retry_after_s"])))
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, huge headers) as JSON 4xx."""
        self.close_connection = True
        if code >= 500:
            code = 400
        try:
            self.reply(code, {"error": message or "bad request"})
        except OSError:
            pass

    def log_message(self, fmt, *args):
        """http.server's request log, as a debug line of ours."""
        log.debug("api %s %s", self.address_string(), fmt % args)

    # -- endpoints ------------------------------------------------------
    def may_see_tenants(self):
        """Whether this client may see tenant names and per-tunnel traffic:
        from an address in METRICS_ALLOW, or with the METRICS_TOKEN bearer."""
        settings = self.server.settings
        token = settings.metrics_token
        if token and secrets.compare_digest(self.secret().encode(), token.encode()):
            return True
        return in_networks(self.client_address[0], settings.metrics_allow)

    def page_status(self):
        """GET /: a short human-readable status page."""
        lines = ["pipe2me server for %s" % self.server.settings.tunnel_domain, ""]
        return 200, "\n".join(lines + self.server.status_lines(self.may_see_tenants())) + "\n"

    def page_config(self):
        """GET /config: what a pod needs to know before it creates a tunnel."""
        s = self.server.settings
        return 200, {"protocol_version": PROTOCOL_VERSION, "tunnel_domain": s.tunnel_domain,
                     "tunnel_port": s.tunnel_port, "http_port": s.http_port,
                     "https_port": s.https_port, "protocols": list(SERVICE_PROTOCOLS)}

    def page_cacert(self):
        """GET /cacert: the CA certificate (PEM)."""
        return 200, self.server.ca.ca_pem()

    def page_metrics(self):
        """GET /metrics: Prometheus text format."""
        return 200, self.server.metrics(self.may_see_tenants())

    def post_tunnels(self):
        """POST /tunnels (token, protocols, proxy_protocol): a new tunnel, with its secret."""
        api, body = self.server, self.body()
        token = field(body, "token", "auth")
        if not token:
            raise Rejected("a token is required (token=...)", http_status=401)
        options = api.token_options(token, self.client_address[0])
        protocols = check_protocols(body.get("protocols", "https"))
        extra = check_settings(body)
        if len(protocols) > options["max_ports"]:
            raise Rejected("%d ports requested, the token allows %d"
                           % (len(protocols), options["max_ports"]), http_status=422)
        record, secret = api.store.create(token, options, protocols, extra=extra)
        log.info("tunnel created tunnel=%s fqdn=%s ports=%s from=%s",
                 record["id"], record["fqdn"], record["ports"], self.client_address[0])
        return 201, dict(public_view(record, api.settings, presence=api.presence), secret=secret)

    def patch_tunnel(self, id):
        """PATCH /tunnels/<id> with the tunnel's secret: new settings; a
        connected pod is asked to reconnect (GOAWAY), so the next session has them."""
        api, body = self.server, self.body()
        record = api.tunnel_for(id, self.secret(body))
        changes = check_settings(body)
        if not changes:
            raise UsageError("nothing to change (known settings: proxy_protocol)")
        if tunnel_status(record) != "online":
            raise Expired("tunnel %s expired" % record["fqdn"])
        updated = api.store.update(record["id"], **changes)
        log.info("tunnel changed tunnel=%s %s", record["id"],
                 " ".join("%s=%s" % (k, v or "off") for k, v in sorted(changes.items())))
        return 200, public_view(updated, api.settings, presence=api.presence)

    def get_tunnel(self, id):
        """GET /tunnels/<id> with the tunnel's secret; with ACME on, its ACME state and chain."""
        api = self.server
        record = api.tunnel_for(id, self.secret())
        view = public_view(record, api.settings, presence=api.presence)
        if api.acme is not None:
            view["acme"] = (api.acme.status(record["id"])
                            or {"state": "none", "reason": "no CSR yet"})
        return 200, view

    def delete_tunnel(self, id):
        """DELETE /tunnels/<id> with the tunnel's secret: the tunnel and its file are gone."""
        record = self.server.tunnel_for(id, self.secret())
        self.server.store.delete(record["id"])
        log.info("tunnel deleted tunnel=%s fqdn=%s", record["id"], record["fqdn"])
        return 200, {"deleted": record["id"]}

    def get_verify(self, id):
        """GET /tunnels/<id>/verify, no secret needed: status, name and expiry."""
        record = self.server.store.get(id) if TUNNEL_ID.fullmatch(id) else None
        if record is None:
            raise NotFound("unknown tunnel", status="unknown")
        status = tunnel_status(record)
        view = {"status": status, "fqdn": record["fqdn"], "expired": status == "expired",
                "expires_at": record["expires_at"]}
        if status == "expired":
            raise Expired("tunnel %s expired" % record["fqdn"], **view)
        return 200, view

    def post_cert(self, id):
        """POST /tunnels/<id>/cert (csr) with the tunnel's secret: the pod's
        CSR signed for its own name; with ACME on, a public chain is ordered."""
        api, body = self.server, self.body()
        record, csr = api.tunnel_for(id, self.secret(body)), body.get("csr")
        if not isinstance(csr, str) or not csr.strip():
            raise UsageError("csr (PEM) is required")
        if tunnel_status(record) != "online":
            raise Expired("tunnel %s expired" % record["fqdn"])
        try:
            leaf = api.certs.sign(record, csr)
        except SigningLimited as exc:
            log.warning("certificate signing limited tunnel=%s retry_after_s=%d",
                        record["id"], exc.retry_after_s)
            raise Unavailable(str(exc), retry_after_s=exc.retry_after_s, http_status=429) from None
        log.info("certificate signed tunnel=%s fqdn=%s", record["id"], record["fqdn"])
        answer = {"cert": leaf.pem, "not_after": leaf.not_after}
        if api.acme is not None:
            api.acme.request(record["id"], record["fqdn"], csr, record.get("token_sha256"))
            answer["acme"] = api.acme.status(record["id"])
        return 200, answer

    def post_extend(self, id):
        """POST /tunnels/<id>/extend (token) with the tunnel's secret: the
        extending token's lifespan is added to the tunnel's."""
        api, body = self.server, self.body()
        record = api.tunnel_for(id, self.secret(body))
        token = field(body, "token", "auth")
        options = api.token_options(token, self.client_address[0])
        if not options["extend"]:
            raise Rejected("this token may not extend tunnels (extend:false)")
        updated = api.store.extend(record["id"], token, options)
        if updated is None:
            raise NotFound("unknown tunnel %s" % record["id"])
        log.info("tunnel extended tunnel=%s expires_at=%d", record["id"], updated["expires_at"])
        return 200, public_view(updated, api.settings, presence=api.presence)

    def post_check(self, id):
        """POST /tunnels/<id>/check: probe the pod's router, with the tunnel's secret."""
        body = self.body()
        record = self.server.tunnel_for(id, self.secret(body))
        if self.server.reachability is None:
            raise NotFound("reachability checks are not available on this server")
        return 200, self.server.reachability(record, self.client_address[0], body)


def answer_and_close(sock, status, headers=(), body="", ctype="text/plain"):
    """A tiny HTTP/1.0 answer from the front itself, then close (408, 429, 431)."""
    payload = body.encode()
    lines = ["HTTP/1.0 %d %s" % (status, http.HTTPStatus(status).phrase), "Content-Type: " + ctype,
             "Content-Length: %d" % len(payload), "Connection: close"] + list(headers)
    try:
        sock.setblocking(True)
        sock.settimeout(2)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


class ApiServer:
    """Runs API requests in threads (at most API_MAX_CONNECTIONS at once) and
    closes any that outlive API_REQUEST_DEADLINE (counted from the hand-over
    by the front, which allows FRONT_HEAD_DEADLINE before it)."""

    def __init__(self, api, tls_context):
        self.api, self.tls_context = api, tls_context
        self.slots = SourceShares(API_MAX_CONNECTIONS, api.settings.api_connections_per_source)

    def serve(self, sock, address, tls):
        """Take over a connection from a front: answer it in a thread, or 429 if it gets no slot."""
        sock.setblocking(True)
        if not self.slots.take(sock, source_prefix(address[0], 32, 64)):
            log.warning("api connection cap reached, closing from=%s:%d cap=%d",
                        address[0], address[1], API_MAX_CONNECTIONS)
            return answer_and_close(
                sock, 429, headers=("Retry-After: 1",),
                body=json.dumps({"error": "too many API requests at once from this address; "
                                          "retry in a second", "retry_after_s": 1}) + "\n",
                ctype="application/json")
        threading.Thread(target=self.handle, args=(sock, address, tls),
                         name="api", daemon=True).start()

    def handle(self, sock, address, tls):
        """In the request's thread: TLS if asked, one request, linger, close."""
        conn = sock
        try:
            sock.settimeout(ApiHandler.timeout)
            if tls:  # wrapping detaches `sock`: its slot (and deadline) moves to the TLS socket
                conn = self.tls_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
                self.slots.rekey(sock, conn)
                conn.do_handshake()
            ApiHandler(conn, address, self.api)
            linger(conn)
        except (OSError, ValueError) as exc:
            log.debug("api connection failed from=%s error=%s", address[0], exc)
        finally:
            self.slots.leave(sock)
            self.slots.leave(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def expire(self, now):
        """Shut down connections held past their deadline (slow clients). The
        plain socket method acts on the descriptor, also under TLS."""
        since = now - self.api.settings.api_request_deadline
        with self.slots.lock:  # a slot's time is when the front handed the connection over
            late = [sock for sock, (_, taken) in self.slots.holders.items() if taken < since]
        for sock in late:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def linger(conn, limit_bytes=4 << 20, limit_s=2.0):
    """Half-close, then read and drop what the client still sends (an
    oversized body answered early), so closing with unread input does not
    reset the connection before the client has read the answer."""
    conn.shutdown(socket.SHUT_WR)
    deadline, dropped = time.monotonic() + limit_s, 0
    while dropped < limit_bytes and time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        data = conn.recv(65536)
        if not data:
            return
        dropped += len(data)

# =====================================================================
# TUNNEL SESSIONS — authenticates pods on TUNNEL_PORT; the Hub keeps one
# live session per tunnel and the public ports of every online tunnel;
# used by the fronts to open streams
# =====================================================================

class PodSession(Mux):
    """The server's end of one pod's tunnel connection."""

    def __init__(self, hub, record, sock, address, features=()):
        self.hub, self.tunnel_id, self.fqdn = hub, record["id"], record["fqdn"]
        self.address = address
        self.wants_addresses = FEATURE_CONSUMER_ADDRESS in features
        self.proxy_protocol = record.get("proxy_protocol") or ""  # as told in WELCOME
        self.draining = False
        self.accepts_cert = FEATURE_CERT in features  # it gets CERT frames
        self.saved_in = self.saved_out = 0
        super().__init__(hub.loop, sock, POD_SENDS, log, hub.settings.heartbeat_interval)
        self.buffer_budget = hub.settings.max_buffered_bytes_per_tunnel
        self.rate_cap = RateCap(record["rate"]) if record.get("rate") else None
        # read again: the session this one replaces has just saved its traffic
        self.allowance = traffic_left(hub.store.get(self.tunnel_id) or record)
        if self.rate_cap or self.allowance is not None:
            self.pace = self.meter

    def meter(self, nbytes):
        """Mux.pace, after every read: the session ends with the read that uses up max_traffic.
        Bytes read from consumers, written to them and waiting for them count, so consumers pass
        the cap by one read (262,144 bytes) at most; the waiting bytes are dropped, unsaved."""
        if self.allowance is not None and (self.local_read_bytes + self.local_written_bytes
                                           + self.buffered) >= self.allowance:
            log.warning("traffic allowance used up tunnel=%s", self.tunnel_id)
            self.destroy("traffic allowance used up")
            return 1.0  # the caller stops reading; the session is closed already
        return self.rate_cap.pace(nbytes) if self.rate_cap else 0

    def on_control(self, msg, obj):
        """GOAWAY from the pod: no new streams, the session ends once the running ones are done."""
        if msg == Msg.GOAWAY:
            log.info("pod going away tunnel=%s reason=%s", self.tunnel_id,
                     printable(obj.get("reason"), 200))
            self.draining = True
            return
        raise ProtocolError("unexpected %s after HELLO" % msg.name)

    def on_stream_closed(self, stream):
        """A draining session ends with its last stream."""
        if self.draining and not self.streams:
            self.destroy("drained")

    def on_closed(self, reason):
        """Log the disconnect and let the hub forget the session."""
        log.info("pod disconnected tunnel=%s pod=%s reason=%s",
                 self.tunnel_id, self.address, reason)
        self.hub.on_session_closed(self)

    def unsaved_traffic(self):
        """(bytes_in, bytes_out) not yet in the store; bytes_in = consumer to pod."""
        return self.local_read_bytes - self.saved_in, self.local_written_bytes - self.saved_out

    def open_stream(self, sock, port, ends=None):
        """Carry a new consumer socket to the pod's `port` service, with `ends` ((ip, port) of
        the consumer, of the public end) in the OPEN if given. What the consumer sent with its
        connect goes in the OPEN's TLS record: the pod connects and writes in one wake-up."""
        self.highest_stream += 1
        self.queue(Msg.OPEN, self.highest_stream, encode_open(port, *(ends or ())))
        stream = self.add_stream(self.highest_stream, sock)
        stream.on_readable()
        if self.out:
            self.flush()
        return stream


class RateCap:
    """Token bucket for a tunnel's `rate` (bytes per second, both directions
    together, bursts of up to one second); Mux.pace calls pace()."""

    def __init__(self, rate):
        self.rate, self.allowance, self.stamp = rate, float(rate), time.monotonic()

    def pace(self, nbytes):
        """Take nbytes from the bucket; the seconds to pause reading (0 within the rate)."""
        now = time.monotonic()
        self.allowance = min(self.rate, self.allowance + (now - self.stamp) * self.rate) - nbytes
        self.stamp = now
        return -self.allowance / self.rate if self.allowance < 0 else 0


def traffic_left(record):
    """Bytes the tunnel may still move under its token's max_traffic (None = no cap)."""
    cap = record.get("max_traffic") or 0
    return cap - record["bytes_in"] - record["bytes_out"] if cap else None


HANDSHAKE_ROTATE_AFTER_S = 1.0   # a source's pending handshake this old may be displaced by its next
HANDSHAKE_WAIT_S = 1.0           # past its source's share, a connection waits this long for a slot
HANDSHAKE_WAITING_MAX = 64       # ... so many at once (a descriptor each, no thread) ...
HANDSHAKE_WAITING_PER_SOURCE = 16  # ... of them from one source, so a flood leaves room


REPLACED_OR_DELETED = ("certificate belongs to no tunnel here (tunnel deleted, or certificate "
                       "replaced by a newer one that has been used)")


class PodGate:
    """Authenticates pod connections in short-lived threads (TLS handshake and
    HELLO are blocking with a deadline), then hands them to the loop."""

    def __init__(self, settings, store, certs, tls_context, loop, attach):
        self.settings, self.store, self.certs, self.context = settings, store, certs, tls_context
        self.loop, self.attach = loop, attach
        self.cap = settings.max_pending_handshakes
        # Until its certificate is verified a connection is a stranger's, in `cap` slots shared
        # by source; a verified pod moves to slots shared by certificate, out of strangers' reach.
        self.strangers = SourceShares(self.cap, settings.max_pending_handshakes_per_source,
                                      HANDSHAKE_ROTATE_AFTER_S)
        self.verified = SourceShares(self.cap, 2, 0.0)
        # Past its share a connection waits (oldest first) for a slot a finished handshake gives
        # back: many pods behind one NAT after a restart queue up instead of being cut off. One
        # waiting displaces nobody; after HANDSHAKE_WAIT_S it is refused as it was on arrival.
        self.waiting = collections.deque()  # (socket, address, source), in the loop thread

    def admit(self, sock, address):
        """A new connection on TUNNEL_PORT: authenticate it, let it wait for a slot, or close."""
        source = source_prefix(address[0], 32, 64)
        if self.strangers.take(sock, source):
            return self.start(sock, address)
        if (len(self.waiting) >= HANDSHAKE_WAITING_MAX or sum(
                entry[2] == source for entry in self.waiting) >= HANDSHAKE_WAITING_PER_SOURCE):
            return self.refuse(sock, address)
        entry = (sock, address, source)
        self.waiting.append(entry)
        self.loop.call_later(HANDSHAKE_WAIT_S, lambda: self.stop_waiting(entry))

    def start(self, sock, address):
        """Authenticate a connection that holds a slot, in its own thread."""
        threading.Thread(target=self.authenticate, args=(sock, address),
                         name="pod-handshake", daemon=True).start()

    def refuse(self, sock, address):
        """Close a connection that gets no slot."""
        log.warning("pod handshake cap reached, closing pod=%s:%d cap=%d",
                    address[0], address[1], self.cap)
        sock.close()

    def admit_waiting(self):
        """In the loop, after a slot came free: the waiting that find one start, oldest first."""
        full = set()  # sources already without a free slot
        for entry in list(self.waiting):
            sock, address, source = entry
            if source not in full and self.strangers.take(sock, source, displace=False):
                self.waiting.remove(entry)
                self.start(sock, address)
            else:
                full.add(source)

    def stop_waiting(self, entry):
        """HANDSHAKE_WAIT_S after it came: a connection still waiting is refused."""
        if entry in self.waiting:
            self.waiting.remove(entry)
            self.refuse(entry[0], entry[1])

    def leave_strangers(self, sock):
        """Give back `sock`'s stranger slot; a waiting connection may take it (in the loop)."""
        if self.strangers.leave(sock):
            self.loop.call_soon_threadsafe(self.admit_waiting)

    def authenticate(self, sock, address):
        """In the handshake thread: TLS, HELLO and the verdict; a welcome pod goes to the loop."""
        peer, tls, welcomed = "%s:%d" % address[:2], sock, False
        try:
            sock.setblocking(True)
            sock.settimeout(self.settings.hello_timeout)
            tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self.strangers.rekey(sock, tls)
            tls.do_handshake()
            self.leave_strangers(tls)
            if not self.verified.take(tls, sha256_hex(tls.getpeercert(binary_form=True) or b"")):
                raise ProtocolError("this certificate has two connections in their greeting")
            record, welcome, features = self.greet(tls)
            tls.settimeout(None)
            self.loop.call_soon_threadsafe(
                lambda: self.attach(record, tls, peer, welcome, features))
            welcomed = True
        except ProtocolError as exc:
            log.warning("pod refused pod=%s reason=%s", peer, exc)
        except (OSError, ValueError) as exc:
            log.info("pod handshake failed pod=%s reason=%s", peer, exc)
        finally:
            self.leave_strangers(tls)   # slots first: a displacement never meets a reused fd
            self.verified.leave(tls)
            if not welcomed:
                tls.close()

    def greet(self, tls):
        """Read HELLO and check it against the client certificate: REJECT, or (record, WELCOME,
        the pod's features); Hub.attach sends the WELCOME once the session is live, so a pod
        that reports "tunnel up" already gets consumers."""
        msg, _stream, payload = read_frame_blocking(
            tls, POD_SENDS, time.monotonic() + self.settings.hello_timeout)
        if msg != Msg.HELLO:
            raise ProtocolError("first frame is %s, not HELLO" % msg.name)
        hello = decode_control(payload)
        record, reason = self.judge(tls, hello)
        if reason:
            refuse_greeted(tls, {"reason": reason, "permanent": True})
            raise ProtocolError(reason)
        features = hello.get("features")
        features = [f for f in features if isinstance(f, str)] if isinstance(features, list) else []
        if hello.get("yield") is True:  # a pod that was replaced: it takes no live session over
            features.append("yield")
        return record, {
            "tunnel": record["id"], "fqdn": record["fqdn"],
            "services": [{"protocol": p, "port": n}
                         for p, n in zip(record["protocols"], record["ports"])],
            "heartbeat_interval_s": self.settings.heartbeat_interval,
            "proxy_protocol": record.get("proxy_protocol") or "",
            "http_port": self.settings.http_port, "https_port": self.settings.https_port}, features

    def judge(self, tls, hello):
        """(record, None), or (None, why the pod is refused for good)."""
        if hello.get("kind") != "control":
            return None, "first frame must name kind 'control'"
        if hello.get("version") != PROTOCOL_VERSION:
            return None, "protocol version %s not supported; this server speaks %d" % (
                printable(repr(hello.get("version")), 40), PROTOCOL_VERSION)
        der = tls.getpeercert(binary_form=True)
        record = self.store.by_cert(sha256_hex(der)) if der else None
        if record is None:
            return None, REPLACED_OR_DELETED
        if hello.get("tunnel") != record["id"]:
            return None, "HELLO names another tunnel than the certificate"
        if tunnel_status(record) != "online":
            return None, "tunnel %s expired" % record["fqdn"]
        if ssl.cert_time_to_seconds(tls.getpeercert().get("notAfter", "")) <= time.time():
            return None, "certificate of %s expired: renew it with `pipe2me_pod.py update`" % (
                record["fqdn"])
        left = traffic_left(record)
        if left is not None and left <= 0:
            return None, "tunnel %s used up its traffic allowance" % record["fqdn"]
        if not self.certs.admit(record, sha256_hex(der)):    # last: admitting retires older certs
            return None, REPLACED_OR_DELETED
        return record, None


ACCEPT_BATCH = 64
ACCEPT_PAUSE_S = 0.5  # after EMFILE: stop accepting briefly instead of spinning


class Listener:
    """A listening socket in the loop; on_accept(sock, address) gets each new
    connection. Survives EMFILE/ENFILE by pausing, never by closing."""

    def __init__(self, loop, sock, on_accept, name):
        self.loop, self.sock, self.on_accept, self.name = loop, sock, on_accept, name
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)
        self.closed = False
        self.paused_since = None  # start of a descriptor shortage: logged once, with its end

    def on_event(self, _mask):
        """Accept up to ACCEPT_BATCH connections and hand each to on_accept."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return self.pause(exc)
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if self.paused_since is not None:
                log.info("accept resumed listener=%s paused_for=%.1fs", self.name,
                         time.monotonic() - self.paused_since)
                self.paused_since = None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.on_accept(conn, address)

    def pause(self, exc):
        """Out of descriptors: new connections wait in the backlog (the kernel
        refuses beyond it) and accept() is retried every ACCEPT_PAUSE_S."""
        if self.paused_since is None:
            self.paused_since = time.monotonic()
            log.warning("accept paused listener=%s error=%s", self.name, exc)
        self.loop.watch(self.sock, 0)
        self.loop.call_later(ACCEPT_PAUSE_S, self.resume)

    def resume(self):
        """Accept again after pause()."""
        if not self.closed:
            self.loop.watch(self.sock, EVENT_READ, self.on_event)

    def close(self):
        """Stop accepting and close the socket; idempotent."""
        if not self.closed:
            self.closed = True
            self.loop.watch(self.sock, 0)
            self.sock.close()


class Hub:
    """Live pod sessions and the public listeners of every online tunnel.
    Lives in the loop thread; other threads reach it through call_soon."""

    def __init__(self, loop, settings, store):
        self.loop, self.settings, self.store = loop, settings, store
        self.sessions = {}
        self.presence = None  # Presence, set by the wiring
        self.listeners = {}  # port -> (tunnel id, Listener)
        self.wanted = {}  # tunnel id -> ports it listens on (or waits for, in unbound)
        self.unbound = {}  # wanted port another socket holds -> tunnel id; expire() retries
        self.accepting = True
        self.cert_view = None  # tunnel id -> ACME state for CERT frames; set by the wiring
        self.on_http_port_accept = None  # Fronts' handler for the ports of http services

    def attach(self, record, tls, peer, welcome, features=()):
        """A pod passed the gate: it replaces any older session of its tunnel and is welcomed
        (refused here, it sees its greeting cut short), then gets its ACME state."""
        current = self.store.get(record["id"])
        if not self.accepting or current is None or tunnel_status(current) != "online":
            tls.close()
            return
        old = self.sessions.get(record["id"])
        if old is not None and "yield" in features and not old.closed:
            log.warning("pod refused, another connection holds the tunnel tunnel=%s pod=%s holder=%s",
                        record["id"], peer, old.address)
            return refuse_greeted(tls, {
                "reason": "tunnel %s is held by another connection from %s" % (
                    record["fqdn"], old.address), "permanent": False, "replaced_by": old.address})
        if old is not None:
            log.warning("pod replaced tunnel=%s old=%s new=%s", record["id"], old.address, peer)
            old.send_control(Msg.GOAWAY, {"reason": "replaced by another connection of this "
                                          "tunnel from %s" % peer, "replaced_by": peer})
            old.destroy("replaced by a new connection from %s" % peer)
        session = self.sessions[record["id"]] = PodSession(self, current, tls, peer, features)
        self.presence.connect(record["id"], peer)
        session.send_control(Msg.WELCOME, welcome)
        log.info("pod connected tunnel=%s fqdn=%s pod=%s", record["id"], record["fqdn"], peer)
        self.push_cert(record["id"])

    def push_cert(self, tunnel_id):
        """Send the tunnel's ACME state and chain to its live pod, if it accepts CERT frames."""
        session = self.sessions.get(tunnel_id)
        view = self.cert_view(tunnel_id) if self.cert_view is not None else None
        if session is None or view is None or not session.accepts_cert:
            return
        session.send_control(Msg.CERT, view)

    def on_session_closed(self, session):
        """Forget a closed session (unless a newer one replaced it) and save its traffic."""
        if self.sessions.get(session.tunnel_id) is session:
            del self.sessions[session.tunnel_id]
            self.presence.disconnect(session.tunnel_id)
        self.save_traffic(session)

    def save_traffic(self, session):
        """Write the session's unsaved byte counts to the store; kept in memory if that fails."""
        got_in, got_out = session.unsaved_traffic()
        session.saved_in, session.saved_out = session.local_read_bytes, session.local_written_bytes
        try:
            self.store.add_traffic(session.tunnel_id, got_in, got_out)
        except OSError as exc:  # counted in memory; the next save of the tunnel writes them
            log.error("traffic not saved tunnel=%s error=%s", session.tunnel_id, exc.strerror)

    def stream_refusal(self, tunnel_id):
        """Why a new stream to the tunnel cannot open now, as (HTTP status, reason), or None."""
        session = self.sessions.get(tunnel_id)
        if session is None or session.closed or session.draining:
            return 502, "the pod is not connected"
        cap = self.settings.max_streams_per_tunnel
        if cap and len(session.streams) >= cap:
            log.warning("stream cap reached tunnel=%s cap=%d", tunnel_id, cap)
            return 503, "the tunnel is at its cap of %d open streams" % cap
        return None

    def open_stream(self, tunnel_id, port, sock, address, ends_of=None):
        """Carry a consumer socket to the tunnel's `port` service: the Stream, or None (the
        socket closed) if stream_refusal() says no. The OPEN names the ends of `ends_of` (the
        consumer's socket when `sock` is the HTTP front's socket pair), else of `sock`."""
        refusal = self.stream_refusal(tunnel_id)
        if refusal is not None:
            log.debug("consumer refused tunnel=%s from=%s reason=%s", tunnel_id, address[0],
                      refusal[1])
            return sock.close()
        session = self.sessions[tunnel_id]
        ends = stream_ends(ends_of or sock, address) if session.wants_addresses else None
        return session.open_stream(sock, port, ends)

    def sync(self, tunnel_id=None):
        """Make listeners and sessions match the store: for one tunnel after
        its change, or for all (start, reload, drain)."""
        if tunnel_id is not None:
            record = self.store.get(tunnel_id)
            online = record is not None and tunnel_status(record) == "online"
            return self.sync_tunnel(tunnel_id, record["ports"] if online else None)
        online = self.store.online_ports(time.time())
        for gone in [t for t in set(self.wanted) | set(self.sessions) if t not in online]:
            self.sync_tunnel(gone, None)
        for tunnel_id, ports in online.items():
            self.sync_tunnel(tunnel_id, ports)

    def sync_tunnel(self, tunnel_id, ports):
        """Listen on `ports` for the tunnel (None: it is offline or gone, so
        its listeners close and its session ends); draining closes listeners only."""
        wanted = set(ports or ()) if self.accepting else set()
        for port in self.wanted.pop(tunnel_id, set()) - wanted:
            self.unlisten(port, tunnel_id)
        if wanted:
            self.wanted[tunnel_id] = wanted
        for port in sorted(wanted):
            if self.listeners.get(port, (None,))[0] != tunnel_id and self.unbound.get(port) != tunnel_id:
                self.unlisten(port)  # a port a deleted tunnel held and this one took over
                self.listen(port, tunnel_id)
        session = self.sessions.get(tunnel_id)
        if ports is None and session is not None:
            reason = "tunnel %s %s" % (session.fqdn, "expired" if self.store.get(tunnel_id)
                                       else "deleted")
            session.send_control(Msg.GOAWAY, {"reason": reason, "permanent": True})
            session.destroy(reason)

    def unlisten(self, port, tunnel_id=None):
        """Close the listener on `port` (only if it is `tunnel_id`'s, when given)."""
        if tunnel_id is None or self.unbound.get(port) == tunnel_id:
            self.unbound.pop(port, None)
        owner, listener = self.listeners.get(port, (None, None))
        if listener is not None and tunnel_id in (None, owner):
            listener.close()
            del self.listeners[port]

    def refresh_session(self, tunnel_id):
        """A connected pod whose tunnel settings changed is asked to reconnect
        (GOAWAY), so that its next WELCOME tells the new ones."""
        session = self.sessions.get(tunnel_id)
        record = self.store.get(tunnel_id) if session is not None else None
        if record is None or (record.get("proxy_protocol") or "") == session.proxy_protocol:
            return
        session.proxy_protocol = record.get("proxy_protocol") or ""
        session.send_control(Msg.GOAWAY, {"reason": "tunnel settings changed, reconnect"})

    def listen(self, port, tunnel_id):
        """Open the public listener; a port some other socket holds is tried
        again by expire(), once a second, until it is free or no longer wanted."""
        try:
            sock = bind_listener(self.settings.listen_address, port)
        except Unavailable as exc:
            if port not in self.unbound:
                log.error("public port unavailable, retrying every %gs tunnel=%s error=%s",
                          SWEEP_INTERVAL_S, tunnel_id, exc)
            self.unbound[port] = tunnel_id
            return
        if self.unbound.pop(port, None) is not None:
            log.info("public port listening tunnel=%s port=%d", tunnel_id, port)
        record = self.store.get(tunnel_id)
        http = record is not None and dict(zip(record["ports"], record["protocols"])).get(port) == "http"
        if http and self.on_http_port_accept is not None:
            on_accept = lambda conn, address: self.on_http_port_accept(tunnel_id, port, conn, address)
        else:
            on_accept = lambda conn, address: self.open_stream(tunnel_id, port, conn, address)
        self.listeners[port] = (tunnel_id, Listener(self.loop, sock, on_accept, "port %d" % port))

    def expire(self, now):
        """Try again the public ports another socket held (tunnels that went
        offline arrive one by one through sync, from the store's expiry order)."""
        for port, tunnel_id in list(self.unbound.items()):
            if self.listeners.get(port, (None,))[0] != tunnel_id:
                self.listen(port, tunnel_id)

    def stream_count(self):
        """Streams open over all sessions."""
        return sum(len(s.streams) for s in self.sessions.values())

    def unsaved_traffic(self, tunnel_id):
        """(bytes in, bytes out) of the tunnel's live session not yet in the store (/metrics)."""
        session = self.sessions.get(tunnel_id)
        return (0, 0) if session is None else session.unsaved_traffic()


def refuse_greeted(tls, reject):
    """REJECT a pod that passed the gate but is not attached, and close it."""
    with contextlib.suppress(OSError):
        tls.settimeout(1)
        tls.sendall(encode_control(Msg.REJECT, reject))
    tls.close()


def stream_ends(sock, address):
    """((consumer ip, port), (public ip, port)) of a consumer socket for the
    OPEN frame; None when the socket is gone already."""
    try:
        public = sock.getsockname()
    except OSError:
        return None
    return (plain_address(address[0]), address[1]), (plain_address(public[0]), public[1])

# =====================================================================
# FRONTS — where consumers arrive by name: the HTTP front (a reverse proxy
# routing every request by its Host; also serves the public ports of http
# services), the SNI-routed HTTPS front, their pending budgets, and the
# HTTP-01 hook. They look up the live session through `hub` (TUNNEL
# SESSIONS) and open streams on it, or hand the API its connections.
# =====================================================================

class Sniffer:
    """Peeks at a new front connection, without consuming bytes (the chosen
    destination sees it untouched), until `parse(head)` returns a callable
    that takes it over (None: need more); gives up after `deadline_s` or
    FRONT_SNIFF_BYTES with on_give_up(sock, late), late: the deadline passed.
    A partial head is peeked at again by timer with backoff, so the selector
    does not spin. on_finish() runs once, when the connection leaves the sniffer."""

    def __init__(self, loop, sock, parse, on_give_up, deadline_s, on_finish):
        self.loop, self.sock, self.parse, self.on_give_up = loop, sock, parse, on_give_up
        self.on_finish = on_finish
        self.deadline = time.monotonic() + deadline_s
        self.delay = 0.005
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.peek)

    def peek(self, _mask=0):
        """Readable (then polled by timer): route by the head, wait with backoff, or give up."""
        self.loop.watch(self.sock, 0)
        try:
            head = self.sock.recv(FRONT_SNIFF_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            head = None
        except OSError:
            head = b""
        if head == b"":  # closed (or failed) before a decision
            return self.finish(lambda sock: sock.close())
        decision = self.parse(head) if head else None
        if decision is not None:
            return self.finish(decision)
        late = time.monotonic() > self.deadline
        if late or (head and len(head) >= FRONT_SNIFF_BYTES):
            return self.finish(lambda sock: self.on_give_up(sock, late))
        self.loop.call_later(self.delay, self.peek)
        self.delay = min(self.delay * 2, 0.25)

    def finish(self, action):
        """Hand the connection to `action`, once."""
        self.on_finish()
        action(self.sock)


def tls_client_hello_sni(head):
    """SNI of a TLS ClientHello: the name, "" without SNI, None if incomplete.
    The ClientHello may span several handshake records (RFC 8446 §5.1), as
    much of it as fits in FRONT_SNIFF_BYTES. Raises ValueError for bytes that
    are not a ClientHello."""
    body, pos = bytearray(), 0
    while len(body) < 4 or len(body) < 4 + int.from_bytes(body[1:4], "big"):
        if len(head) < pos + 5:
            return None
        if head[pos] != 22 or head[pos + 1] != 3:
            raise ValueError("not a TLS handshake record")
        record_len = int.from_bytes(head[pos + 3:pos + 5], "big")
        if not 0 < record_len <= 16384:
            raise ValueError("bad TLS record length")
        if len(head) < pos + 5 + record_len:
            return None
        body += head[pos + 5:pos + 5 + record_len]
        pos += 5 + record_len
        if body[0] != 1:
            raise ValueError("not a ClientHello")
        if len(body) >= 4 and 4 + int.from_bytes(body[1:4], "big") > FRONT_SNIFF_BYTES:
            raise ValueError("ClientHello larger than %d bytes" % FRONT_SNIFF_BYTES)
    return client_hello_server_name(bytes(body[:4 + int.from_bytes(body[1:4], "big")]))


def client_hello_server_name(body):
    """The server_name of a whole ClientHello handshake message, "" without it."""
    pos = 4 + 2 + 32                                   # type+len, version, random
    pos += 1 + body[pos]                               # session id
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]                               # compression methods
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    while pos + 4 <= min(end, len(body)):
        ext_type = int.from_bytes(body[pos:pos + 2], "big")
        ext_len = int.from_bytes(body[pos + 2:pos + 4], "big")
        if ext_type == 0:
            name_len = int.from_bytes(body[pos + 7:pos + 9], "big")
            return body[pos + 9:pos + 9 + name_len].decode("ascii").lower().rstrip(".")
        pos += 4 + ext_len
    return ""


# ---- HTTP/1.1 messages (RFC 9112): what the HTTP front needs to route each
# request, set its forwarding headers and find where each message ends. It is
# strict where a lenient reading would let two parsers disagree (smuggling).

HTTP_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(rb"(%s) ([\x21-\x7e]+) HTTP/(1\.[01])" % HTTP_TOKEN)
STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
HOST_VALUE = re.compile(rb"(?P<name>[A-Za-z0-9.\-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
CONTROL_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"
FORWARDING_FIELDS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded")
CHUNK_LINE_BYTES = 4096
ACME_CHALLENGE = re.compile(r"/\.well-known/acme-challenge/([A-Za-z0-9_-]{1,256})")


class BadMessage(ValueError):
    """An HTTP message the front refuses (a request gets 400)."""


def split_head(buffer):
    """(head without its blank line, bytes it took) once buffer holds a whole
    head, else None. Empty lines before it are skipped (RFC 9112 §2.2); bare
    LF line ends are read as CRLF (the head is written anew with CRLF)."""
    start = 0
    while buffer[start:start + 2] == b"\r\n" or buffer[start:start + 1] == b"\n":
        start += 2 if buffer[start:start + 1] == b"\r" else 1
    end = re.compile(rb"\r?\n\r?\n").search(buffer, start)
    if end is None:
        return None
    return bytes(buffer[start:end.start()]), end.end()


def parse_head(head, start_line):
    """(groups of the `start_line` match, [(lower-case name, name, value)]) of
    a whole head (at most FRONT_SNIFF_BYTES). BadMessage for a malformed start
    line, obs-fold, a bad field name or a control character (bare CR too) in a value."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    match = start_line.fullmatch(lines[0])
    if match is None:
        raise BadMessage("malformed %s line" % ("request" if start_line is REQUEST_LINE
                                                else "status"))
    fields = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadMessage("obsolete line folding in the header")
        name, colon, value = line.partition(b":")
        if not colon or not re.fullmatch(HTTP_TOKEN, name):
            raise BadMessage("malformed header line")
        value = value.strip(b" \t")
        if CONTROL_IN_VALUE.search(value):
            raise BadMessage("control character in header %s" % name.decode("ascii"))
        fields.append((name.lower(), name, value))
    return match.groups(), fields


def field_values(fields, key):
    """The values of every field named `key` (lower case), in order."""
    return [value for name, _, value in fields if name == key]


def list_values(fields, key):
    """The lower-case elements of every comma-separated field named `key`."""
    return [v.strip().lower() for value in field_values(fields, key) for v in value.split(b",")]


def body_framing(fields, version):
    """How the body of a message ends: ("length", n) or ("chunked", 0).
    BadMessage for the smuggling shapes: Content-Length beside
    Transfer-Encoding, differing Content-Lengths, codings not ending in a
    single chunked, Transfer-Encoding in HTTP/1.0."""
    codings = list_values(fields, b"transfer-encoding")
    lengths = set(list_values(fields, b"content-length"))
    if codings:
        if lengths:
            raise BadMessage("both Content-Length and Transfer-Encoding")
        if version == b"1.0":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 message")
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise BadMessage("transfer codings must end in one chunked")
        return "chunked", 0
    if len(lengths) > 1:
        raise BadMessage("differing Content-Length values")
    length = lengths.pop() if lengths else b"0"
    if not re.fullmatch(rb"[0-9]{1,15}", length):
        raise BadMessage("bad Content-Length")
    return "length", int(length)


def ends_connection(fields, version):
    """Whether a message's Connection options (or HTTP/1.0 without
    keep-alive) end the connection after it."""
    options = list_values(fields, b"connection")
    return b"close" in options or (version == b"1.0" and b"keep-alive" not in options)


class Request:
    """One request head as the HTTP front routes and forwards it."""

    def __init__(self, method, target, version, fields):
        self.method, self.target, self.version, self.fields = method, target, version, fields
        self.framing = body_framing(fields, version)
        hosts = field_values(fields, b"host")
        if len(hosts) > 1:
            raise BadMessage("more than one Host header")
        if version == b"1.1" and not hosts:
            raise BadMessage("an HTTP/1.1 request needs a Host header")
        match = HOST_VALUE.fullmatch(hosts[0]) if hosts else None
        if hosts and match is None:
            raise BadMessage("malformed Host header")
        self.host = hosts[0].decode("ascii") if hosts else ""
        self.name = match.group("name").decode().lower().strip("[]").rstrip(".") if match else ""
        self.upgrade = method == b"CONNECT" or (b"upgrade" in list_values(
            fields, b"connection") and bool(field_values(fields, b"upgrade")))
        self.close = ends_connection(fields, version)  # also set by a response that ends it
        self.has_body = self.framing != ("length", 0)
        self.accept = b",".join(field_values(fields, b"accept")).decode("latin-1")
        self.check_target()

    def check_target(self):
        """An absolute-form target must name the Host it is sent with."""
        target = self.target.decode("ascii")
        if target.startswith("/") or target == "*" or self.method == b"CONNECT":
            self.path = target if target.startswith("/") else "/"
            return
        try:
            url = urllib.parse.urlsplit(target)
            hostname = (url.hostname or "").rstrip(".")
        except ValueError:
            raise BadMessage("malformed request target") from None
        if url.scheme.lower() not in ("http", "https") or not url.netloc:
            raise BadMessage("malformed request target")
        if hostname != self.name:
            raise BadMessage("request target and Host name different hosts")
        self.path = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))


def parse_request(head):
    """The Request of a whole head, or BadMessage."""
    (method, target, version), fields = parse_head(head, REQUEST_LINE)
    return Request(method, target, version, fields)


def response_framing(head, request):
    """(kind, length, close) of a response head from a service to `request`:
    kind "interim" (1xx: the final response follows), "none", "length",
    "chunked", "close" (ends with the connection; so does a head the front
    cannot frame) or "raw" (101 to an Upgrade, 2xx to a CONNECT: the bytes
    pass as they are from then on)."""
    try:
        (version, status), fields = parse_head(head, STATUS_LINE)
        kind, length = body_framing(fields, version)
    except BadMessage:
        return "close", 0, True
    status, close = int(status), ends_connection(fields, version)
    if ((status == 101 and request.upgrade)
            or (request.method == b"CONNECT" and 200 <= status < 300)):
        return "raw", 0, close
    if status < 200:
        return "interim", 0, close
    if status in (204, 304) or request.method == b"HEAD":
        return "none", 0, close
    if kind == "length" and not field_values(fields, b"content-length"):
        return "close", 0, True
    return kind, length, close


class BodyReader:
    """Finds where a body ends: feed(data) says how many leading bytes of
    data (bytes or bytearray: it is searched) belong to it; `done` once it has
    ended. Chunked framing is read strictly (CRLF line ends, hex sizes,
    bounded lines); BadMessage if not."""

    def __init__(self, kind, length=0):
        self.kind, self.left = kind, length
        self.state = "size" if kind == "chunked" else "data"
        self.line = bytearray()
        self.done = kind == "none" or (kind == "length" and not length)

    def feed(self, data):
        """How many bytes of `data` belong to the body (all, for a body that ends at close)."""
        if self.kind == "close":
            return len(data)
        pos = 0
        while pos < len(data) and not self.done:
            if self.state == "data":  # of a Content-Length body, or of one chunk
                take = min(self.left, len(data) - pos)
                self.left -= take
                pos += take
                if not self.left:
                    self.state, self.done = "data-end", self.kind == "length"
                continue
            end = data.find(b"\n", pos)
            piece = data[pos:] if end < 0 else data[pos:end + 1]
            self.line += piece
            pos += len(piece)
            if len(self.line) > CHUNK_LINE_BYTES:
                raise BadMessage("chunk line over %d bytes" % CHUNK_LINE_BYTES)
            if end >= 0:
                self.on_line(bytes(self.line))
                del self.line[:]
        return pos

    def on_line(self, line):
        """One chunk-size, chunk-end or trailer line; BadMessage if malformed."""
        if not line.endswith(b"\r\n"):
            raise BadMessage("chunk line without CRLF")
        line = line[:-2]
        if self.state == "size":
            match = CHUNK_SIZE_LINE.fullmatch(line)
            if match is None:
                raise BadMessage("malformed chunk size")
            self.left = int(match.group(1), 16)
            self.state = "data" if self.left else "trailer"
        elif self.state == "data-end":
            if line:
                raise BadMessage("chunk data longer than its size")
            self.state = "size"
        elif not line:
            self.done = True
        elif line[:1] in (b" ", b"\t") or CONTROL_IN_VALUE.search(line):
            raise BadMessage("malformed trailer field")


def forwarding_fields(request, peer, trusted):
    """The request's header lines with X-Forwarded-For/-Proto/-Host and
    Forwarded (RFC 7239) naming the peer: what the consumer sent is dropped,
    unless the peer is a trusted proxy, whose values are extended. Names
    spelt with "_" count too (CGI and WSGI read them as the same field)."""
    kept, prior = [], collections.defaultdict(list)
    for key, name, value in request.fields:
        key = key.replace(b"_", b"-")
        if key in FORWARDING_FIELDS:
            prior[key].append(value.decode("latin-1"))
        else:
            kept.append(b"%s: %s" % (name, value))
    prior = {key: ", ".join(values) for key, values in prior.items() if trusted}
    node = '"[%s]"' % peer if ":" in peer else peer
    element = 'for=%s;host="%s";proto=http' % (node, request.host)
    added = [
        ("X-Forwarded-For", ", ".join(filter(None, (prior.get(b"x-forwarded-for"), peer)))),
        ("X-Forwarded-Proto", prior.get(b"x-forwarded-proto") or "http"),
        ("X-Forwarded-Host", prior.get(b"x-forwarded-host") or request.host),
        ("Forwarded", ", ".join(filter(None, (prior.get(b"forwarded"), element))))]
    return kept + [("%s: %s" % pair).encode("latin-1") for pair in added]


def local_answer(status, text, request=None, headers=(), close=False):
    """An answer from the front itself, never cached, no version in Server:
    an HTTP-01 key authorization (`text` as bytes) as it is, else a short
    HTML page for browsers (by Accept) or plain text for curl and scripts.
    A HEAD `request` gets the head alone."""
    title = "%d %s" % (status, http.HTTPStatus(status).phrase)
    if isinstance(text, bytes):
        body, ctype = text, "application/octet-stream"
    elif request is not None and "text/html" in request.accept:
        body = ("<!doctype html>\n<html><head><title>%s</title></head><body>\n<h1>%s</h1>\n"
                "<p>%s</p>\n<hr><p>pipe2me</p>\n</body></html>\n" % (
                    title, title, html.escape(text))).encode()
        ctype = "text/html; charset=utf-8"
    else:
        body, ctype = ("%s: %s\n" % (title, text)).encode(), "text/plain; charset=utf-8"
    lines = ["HTTP/1.1 " + title, "Server: pipe2me", "Content-Type: " + ctype,
             "Content-Length: %d" % len(body), "Cache-Control: no-store"] + list(headers)
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if request is not None and request.method == b"HEAD" else head + body


def reset_answer(reason):
    """(status, text) for a stream the pod reset before any response."""
    if reason is None:
        return 502, "the service closed the connection without a response"
    reason = printable(reason)
    if reason.startswith(RESET_CONNECT_TIMED_OUT) or "timed out" in reason:
        return 504, "the local service did not accept the connection in time (%s)" % reason
    return 503, "the local service refused the connection (%s)" % reason


# Cleartext HTTP/2 with prior knowledge is refused clearly: an empty SETTINGS
# frame, then GOAWAY with HTTP_1_1_REQUIRED (0xd) and a message (RFC 9113 §6).
H2C_GOAWAY = (struct.pack("!II", 0, 0xd)
              + b"pipe2me: HTTP/2 needs TLS here; use HTTP/1.1 or https://")
H2C_REFUSAL = (bytes(3) + b"\x04" + bytes(5)
               + len(H2C_GOAWAY).to_bytes(3, "big") + b"\x07" + bytes(5) + H2C_GOAWAY)
FRONT_BUFFER_BYTES = 256 * 1024   # per direction, before reading its source stops
FRONT_LINGER_S = 2.0              # after the last answer: read and drop, then close


class Upstream:
    """The front's end of a stream to one tunnel's http service: a socket
    pair whose other end the Mux relays like a consumer socket."""

    def __init__(self, tunnel_id, fqdn):
        self.tunnel_id, self.fqdn = tunnel_id, fqdn
        self.sock, self.peer_sock = socket.socketpair()
        self.sock.setblocking(False)
        self.stream = None
        self.out = bytearray()       # request bytes not yet written to the pair
        self.head = bytearray()      # the response head being read
        self.body = None             # BodyReader of the response body being relayed
        self.closed = False


class HttpFrontConnection:
    """One consumer connection on the HTTP front (or on the per-port URL of
    an http service, `pinned` to its tunnel), served as a reverse proxy.

    Each request is routed by its own Host: answered here or forwarded over
    a stream to its tunnel's http service, with forwarding fields naming the
    consumer. It goes only once every earlier request has its response, or
    they all went to the same stream (pipelining to one service): responses
    come back in order and no request reaches another tunnel's pod. Each
    response is framed to know where it ends; after a 101 to an Upgrade or a
    2xx to a CONNECT, bytes pass raw. A request for the API mid-connection
    ends the connection cleanly, so the client retries on a new one."""

    def __init__(self, fronts, sock, address, pinned=None):
        self.fronts, self.loop, self.sock, self.address = fronts, fronts.loop, sock, address
        self.pinned = pinned               # (tunnel id, port) of a per-port URL
        self.peer = plain_address(address[0].partition("%")[0])  # ::ffff:a.b.c.d as a.b.c.d
        self.trusted = in_networks(self.peer, fronts.settings.trusted_proxies)
        self.inbuf, self.out = bytearray(), bytearray()
        self.waiting = collections.deque()  # forwarded requests without their response
        self.next = None                    # (Request, bytes) parsed, not yet dispatched
        self.body = None                    # BodyReader of the request body being read
        self.up = None                      # Upstream of the current tunnel
        self.last_words = b""               # a refusal due once the earlier answers are out
        self.raw = self.read_closed = self.finishing = self.lingering = self.closed = False
        self.idle_since = self.heard = time.monotonic()  # heard: the consumer's last bytes
        sock.setblocking(False)
        self.loop.call_later(fronts.settings.front_head_deadline, self.on_deadline)
        self.update_interest()

    # -- events -----------------------------------------------------------
    def update_interest(self):
        """Watch each socket for what its buffers allow: reads stop when
        full, the consumer's also while answers to it wait unread."""
        up_full = self.up is not None and len(self.up.out) >= FRONT_BUFFER_BYTES
        events = EVENT_WRITE if self.out else 0
        out_full = len(self.out) >= FRONT_BUFFER_BYTES  # answers the consumer does not read
        if not self.read_closed and (self.finishing or (
                len(self.inbuf) < FRONT_SNIFF_BYTES and not up_full and not out_full)):
            events |= EVENT_READ
        self.loop.watch(self.sock, events, self.on_event)
        up = self.up
        if up is not None and not up.closed:
            events = EVENT_WRITE if up.out else 0
            if len(self.out) < FRONT_BUFFER_BYTES:
                events |= EVENT_READ
            self.loop.watch(up.sock, events, self.on_upstream_event)

    def on_event(self, mask):
        """Loop callback of the consumer's socket: write, then read the next requests."""
        if mask & EVENT_WRITE:
            self.flush(self.sock, self.out)
        if mask & EVENT_READ and not self.closed:
            data = self.receive(self.sock)
            if data is None:
                return self.destroy()
            if data == b"":
                self.read_closed = True
                if self.lingering:
                    return self.destroy()
            elif data and not self.finishing:  # a finishing connection drops what comes
                self.heard = time.monotonic()
                self.inbuf += data
                self.advance()
        self.after_io()

    def on_upstream_event(self, mask):
        """Loop callback of the upstream stream: write the request, read the response."""
        up = self.up  # (a dropped stream's socket is unwatched: no callback comes for it)
        if mask & EVENT_WRITE:
            self.flush(up.sock, up.out, up)
        if mask & EVENT_READ and not up.closed and self.up is up:
            data = self.receive(up.sock)
            if data is None or data == b"":
                self.on_upstream_eof(up)
            elif data:
                self.on_response_bytes(data)
        self.after_io()

    def receive(self, sock):
        """Bytes, b"" at EOF, None after an error, False if nothing yet."""
        try:
            return sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None

    def flush(self, sock, buffer, up=None):
        """Write what the socket takes of `buffer`; a failed write ends its side."""
        try:
            sent = sock.send(buffer) if buffer else 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if up is None:
                return self.destroy()
            return self.on_upstream_eof(up)
        del buffer[:sent]

    def after_io(self):
        """After every event: half-close, finish or linger as the state says; re-arm events."""
        if self.closed:
            return
        if self.raw and self.read_closed and self.up is not None and not self.up.out:
            with contextlib.suppress(OSError):
                self.up.sock.shutdown(socket.SHUT_WR)
        if self.read_closed and not self.waiting and not self.raw and not self.finishing:
            self.finish()
        if self.finishing and not self.waiting:
            self.out += self.last_words
            self.last_words = b""
            if not self.out:
                self.linger()
        if not self.closed:
            self.update_interest()

    # -- requests ---------------------------------------------------------
    def advance(self):
        """Take what the consumer sent as far as it can go now."""
        while not self.closed and not self.finishing:
            if self.raw:
                self.up.out += self.inbuf
                del self.inbuf[:]
                return
            if self.body is not None:
                if not self.read_body():
                    return
                continue
            if self.waiting and self.waiting[-1].upgrade:
                return  # the bytes after an Upgrade or CONNECT may be raw: wait for its answer
            if not self.take_request():
                return

    def read_body(self):
        """Pass the request body on as far as it has come; True once it ended."""
        try:
            used = self.body.feed(self.inbuf)
        except BadMessage as exc:  # the stream got half a request: it cannot go on
            self.drop_upstream()
            self.waiting.clear()
            return self.refuse(400, str(exc))
        if self.up is not None:
            self.up.out += self.inbuf[:used]
        del self.inbuf[:used]
        if not self.body.done:
            return False
        self.body = None
        return True

    def take_request(self):
        """Parse, route and dispatch the next request head; False to wait."""
        if self.next is None:
            found = split_head(self.inbuf)
            if found is None:
                if len(self.inbuf) >= FRONT_SNIFF_BYTES:
                    return self.refuse(431, "request head over %d bytes" % FRONT_SNIFF_BYTES)
                return False
            if found[0].startswith(HTTP2_PREFACE[:12]) and not self.waiting:
                log.warning("http front refused cleartext HTTP/2 (prior knowledge) from=%s",
                            shown_address(self.address))
                self.out += H2C_REFUSAL
                return self.finish()
            try:
                self.next = (parse_request(found[0]), found[1])
            except BadMessage as exc:
                return self.refuse(400, str(exc))
        request, size = self.next
        route = self.fronts.route_request(request, self.pinned)
        if self.waiting and not (route[0] == "up" and self.up is not None
                                 and self.up.tunnel_id == route[1]["id"]):
            return False  # earlier responses first, from another stream or the front
        self.next = None
        del self.inbuf[:size]
        return self.dispatch(request, route)

    def dispatch(self, request, route):
        """Act on a routed request; True to go on with the next one."""
        if route[0] == "api":  # the API serves whole connections: the client retries on a new one
            return self.finish()
        if route[0] == "up":
            refusal = self.forward(request, route[1], route[2])
            if refusal is None:
                return True
            route = ("answer",) + refusal
        status, text, headers = route[1], route[2], route[3] if len(route) > 3 else ()
        close = request.close or request.has_body or status >= 500
        self.out += local_answer(status, text, request, headers, close)
        self.idle_since = time.monotonic()
        return self.finish() if close else True

    def forward(self, request, record, port):
        """Send the request to its tunnel's stream; (status, text) if it cannot go."""
        if self.up is not None and self.up.tunnel_id != record["id"]:
            self.drop_upstream()
        if self.up is None:
            hub = self.fronts.hub
            refusal = hub.stream_refusal(record["id"])
            if refusal is not None:
                log.info("http front answered status=%d tunnel=%s from=%s reason=%s", refusal[0],
                         record["id"], shown_address(self.address), refusal[1])
                return refusal[0], "%s: %s" % (record["fqdn"], refusal[1])
            self.up = Upstream(record["id"], record["fqdn"])
            self.up.stream = hub.open_stream(record["id"], port, self.up.peer_sock, self.address,
                                             ends_of=self.sock)
        head = [b"%s %s HTTP/%s" % (request.method, request.target, request.version)]
        head += forwarding_fields(request, self.peer, self.trusted)
        self.up.out += b"\r\n".join(head) + b"\r\n\r\n"
        self.waiting.append(request)
        self.body = BodyReader(*request.framing)
        return None

    def refuse(self, status, text):
        """A request the front will not take: answer once the earlier ones are, then close."""
        log.info("http front refused from=%s status=%d reason=%s", shown_address(self.address),
                 status, text)
        self.last_words = local_answer(status, text, close=True)
        return self.finish()

    # -- responses --------------------------------------------------------
    def on_response_bytes(self, data):
        """Relay response bytes in order; each complete response lets the
        next request go. Bytes past a response whose next request went to
        another tunnel are dropped with their stream: they answer nothing."""
        up = self.up
        while len(data) and not self.closed and self.up is up:
            if self.raw:
                self.out += data
                return
            if not self.waiting:  # bytes nobody asked for: this stream is done
                return self.drop_upstream()
            if up.body is None:
                data = self.read_response_head(up, data)
                continue
            try:
                used = up.body.feed(data)
            except BadMessage as exc:  # the consumer has the head: only closing can tell it
                log.info("http front cut a response tunnel=%s reason=%s", up.tunnel_id, exc)
                return self.on_upstream_eof(up)
            self.out += data[:used]
            data = data[used:]
            if up.body.done:
                self.response_done(up)

    def read_response_head(self, up, data):
        """Collect a response head; relay it once whole and frame its body.
        Returns the bytes after it."""
        up.head += data
        found = split_head(up.head)
        if found is None:
            if len(up.head) >= FRONT_SNIFF_BYTES:  # unframeable: relay it until it closes
                self.out += up.head
                up.head, up.body = bytearray(), BodyReader("close")
            return b""
        self.out += up.head[:found[1]]
        rest, up.head = bytes(up.head[found[1]:]), bytearray()
        request = self.waiting[0]
        kind, length, close = response_framing(found[0], request)
        request.close = request.close or close
        if kind == "raw":
            self.raw = True
            self.waiting.clear()
            self.up.out += self.inbuf
            del self.inbuf[:]
        elif kind != "interim":
            up.body = BodyReader(kind, length)
            if up.body.done:
                self.response_done(up)
        return rest

    def response_done(self, up):
        """A whole response is relayed: the next request may go."""
        up.body = None
        if self.waiting.popleft().close:
            self.waiting.clear()
            return self.finish()
        if not self.waiting:
            self.idle_since = time.monotonic()
            self.advance()

    def on_upstream_eof(self, up):
        """The upstream ended: a request it left without a response gets
        502/503/504, and the connection ends with what was due on it."""
        if up.closed:
            return
        due = bool(self.waiting) or self.raw
        if self.waiting and not up.head and up.body is None:  # no byte of its response came
            status, text = reset_answer(up.stream.reset_reason if up.stream else None)
            log.info("http front answered status=%d tunnel=%s reason=%s", status, up.tunnel_id,
                     text)
            self.out += local_answer(status, "%s: %s" % (up.fqdn, text), self.waiting[0],
                                     close=True)
        self.drop_upstream()
        if due:
            self.waiting.clear()
            self.finish()

    def drop_upstream(self):
        """Close the current stream (its Stream sees EOF and ends)."""
        up, self.up = self.up, None
        if up is not None and not up.closed:
            up.closed = True
            self.loop.watch(up.sock, 0)
            up.sock.close()

    # -- the end ----------------------------------------------------------
    def finish(self):
        """No more requests: send what is due, then close without a reset.
        False: nothing more to take."""
        self.finishing = True
        self.next = None
        del self.inbuf[:]
        return False

    def linger(self):
        """Everything is out: half-close, drop what the client still sends,
        close at its EOF or after FRONT_LINGER_S."""
        if self.lingering:
            return
        self.lingering = True
        self.drop_upstream()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        if self.read_closed:
            return self.destroy()
        self.loop.call_later(FRONT_LINGER_S, self.destroy)

    def on_deadline(self):
        """A connection waiting for a request head, or for more of a request
        body, for FRONT_HEAD_DEADLINE is closed."""
        if self.closed:
            return
        limit, since = self.fronts.settings.front_head_deadline, None
        if not self.raw and not self.finishing:
            if self.body is None and not self.waiting:
                since = self.idle_since  # waiting for a request head
            elif self.body is not None and (self.up is None or not self.up.out):
                since = self.heard  # for a body the consumer, not the pod, holds up
        left = limit if since is None else since + limit - time.monotonic()
        if left <= 0 and self.inbuf and self.body is None and not self.waiting:
            self.refuse(408, "request head incomplete after %g s" % limit)
            return self.after_io()
        if left <= 0:
            log.debug("http front head deadline from=%s", shown_address(self.address))
            return self.destroy()
        self.loop.call_later(left, self.on_deadline)

    def destroy(self):
        """Close both sockets now; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.drop_upstream()
        self.loop.watch(self.sock, 0)
        self.sock.close()


def http_head_host(head):
    """Host of a complete HTTP request head read leniently (for heads the
    strict parser refuses: they go to the API unless they name a tunnel),
    "" when it has none, None if incomplete."""
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None:
        return None
    for line in head[:end.start()].split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            return re.sub(r":\d+$", "", host).strip("[]").rstrip(".")
    return ""


def service_port(record, protocol):
    """The public port of the tunnel's `protocol` service, None without one."""
    protocols = record["protocols"]
    return record["ports"][protocols.index(protocol)] if protocol in protocols else None


class Fronts:
    """Routes front connections: the HTTP front by each request's Host (an
    HttpFrontConnection per consumer, also on the per-port URL of an http
    service), the HTTPS front by SNI; each front has its own PendingBudget.
    `acme_http01(token) -> bytes | None` answers HTTP-01 challenges on any
    name of the HTTP front (None: 404), on the loop thread: it must not block."""

    def __init__(self, loop, settings, hub, api_server, acme_http01=None):
        self.loop, self.settings, self.hub, self.api_server = loop, settings, hub, api_server
        self.acme_http01 = acme_http01
        self.budgets = {name: PendingBudget(name, settings.max_pending_front,
                                            settings.max_pending_front_per_source)
                        for name in ("http", "https")}

    def sniff(self, front, sock, address, parse, on_give_up):
        """Hold a new front connection until its head routes it, within the
        front's pending budget; over it, the connection is closed at once."""
        budget = self.budgets[front]
        key = budget.take(address)
        if key is None:
            return sock.close()
        Sniffer(self.loop, sock, parse, on_give_up, self.settings.front_head_deadline,
                lambda: budget.give_back(key))

    def is_api_name(self, name):
        """Whether a Host or SNI name means the API (the bare domain, localhost, no tunnel name)."""
        domain = self.settings.tunnel_domain
        return name in ("", domain, "localhost") or not name.endswith("." + domain)

    # -- HTTP front -----------------------------------------------------
    def on_http_accept(self, sock, address):
        """A new connection on HTTP_PORT: sniff its Host."""
        self.sniff("http", sock, address, lambda head: self.route_http(head, address),
                   lambda s, late: answer_and_close(s, 408 if late else 431))

    def on_http_port_accept(self, tunnel_id, port, sock, address):
        """A consumer of the per-port URL of an http service."""
        HttpFrontConnection(self, sock, address, pinned=(tunnel_id, port))

    def route_http(self, head, address):
        """The first request of a connection: the API takes connections for
        the bare domain whole; everything else is served request by request."""
        serve = lambda sock: HttpFrontConnection(self, sock, address)
        api = lambda sock: self.api_server.serve(sock, address, tls=False)
        found = split_head(head)
        if found is None:  # only empty lines so far; the API answers a head of nothing
            return None if http_head_host(head) is None else api
        if found[0].startswith(HTTP2_PREFACE[:12]):
            return serve
        try:
            request = parse_request(found[0])
        except BadMessage:  # the API answers it, unless it names a tunnel: then the 400 is ours
            to_api = self.is_api_name(http_head_host(head))
        else:
            to_api = self.is_api_name(request.name) and not self.acme_token(request)
        return api if to_api else serve

    def acme_token(self, request):
        """The token of an HTTP-01 challenge request, else None."""
        match = ACME_CHALLENGE.fullmatch(request.path.partition("?")[0])
        return match.group(1) if match and request.method in (b"GET", b"HEAD") else None

    def route_request(self, request, pinned):
        """Where a request goes: ("api",), ("up", record, port) or ("answer",
        status, text[, headers]); an HTTP-01 answer (RFC 8555 §8.3) is bytes."""
        token = None if pinned else self.acme_token(request)
        if token is not None:
            body = self.acme_http01(token) if self.acme_http01 else None
            return ("answer", 200, body) if body is not None else (
                "answer", 404, "no challenge %s" % token)
        if pinned is None and self.is_api_name(request.name):
            return ("api",)
        record = self.hub.store.get(pinned[0]) if pinned else self.hub.store.by_fqdn(request.name)
        name = record["fqdn"] if record else request.name
        if record is None or tunnel_status(record) != "online":
            return "answer", 404, "no tunnel %s" % name
        port = pinned[1] if pinned else service_port(record, "http")
        if port is not None:
            return "up", record, port
        port = service_port(record, "https")
        if port is not None:
            target = "https://%s:%d%s" % (name, port, urllib.parse.quote(
                request.path, safe="/?#[]@!$&'()*+,;=:%~-._"))
            return "answer", 308, target, ["Location: " + target]
        return "answer", 404, "%s has no http service" % name

    # -- HTTPS front ----------------------------------------------------
    def on_https_accept(self, sock, address):
        """A new connection on HTTPS_PORT: sniff its SNI."""
        self.sniff("https", sock, address, lambda head: self.route_https(head, address),
                   lambda s, _late: s.close())

    def route_https(self, head, address):
        """Where a ClientHello goes by SNI: the API, its https service (passed through), closed."""
        try:
            name = tls_client_hello_sni(head)
        except (ValueError, IndexError, UnicodeDecodeError):
            return lambda sock: sock.close()
        if name is None:
            return None
        if self.is_api_name(name):
            return lambda sock: self.api_server.serve(sock, address, tls=True)
        record = self.hub.store.by_fqdn(name)
        port = service_port(record, "https") if record else None
        if port is None or tunnel_status(record) != "online":
            return lambda sock: sock.close()
        return lambda sock: self.hub.open_stream(record["id"], port, sock, address)

# =====================================================================
# REACHABILITY — whether a pod's router answers on every port of its
# tunnel, kept in the tunnel record; run by the API (POST
# /tunnels/<id>/check, wired in by the Server) and by `dns-refresh`
# =====================================================================
#
# A tunnel's name points to the pod's router when the last check found
# every port of the tunnel reachable there ("direct"), to the server
# otherwise ("relayed"). The check is kept in the tunnel record:
#     reach = {status: direct|relayed, address, lan_address, cgnat,
#              ports: {port: ok}, checked_at, reason}
# The check probes the address the request came from; the pod may add the
# router's external_address as NAT-PMP/UPnP told it (carrier-grade NAT shows
# as a mismatch) and its own lan_address (for DNS's split horizon).

PROBE_TIMEOUT_S = 3.0              # per port: TCP connect, then the TLS handshake
PROBE_MAX_PARALLEL = 8


def is_own_address(address, settings):
    """True when probing `address` would reach this host's own listeners:
    loopback, unspecified, PUBLIC_ADDRESS, or any address a socket here can bind."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified or address in settings.public_address:
        return True
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                       socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def probe_port(address, port, protocol, fqdn, fingerprints):
    """Connect to address:port (and for https complete a TLS handshake whose
    certificate is one of `fingerprints`); None when reachable, else why not."""
    try:
        sock = socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S)
    except OSError as exc:
        return "port %d: %s" % (port, exc.strerror or exc)
    with sock:
        if protocol != "https":
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # judged below by the tunnel's own fingerprints
        try:
            with context.wrap_socket(sock, server_hostname=fqdn) as tls:
                der = tls.getpeercert(binary_form=True)
        except (OSError, ValueError) as exc:
            return "port %d: TLS handshake failed: %s" % (port, exc)
    if not der or sha256_hex(der) not in fingerprints:
        return "port %d: the TLS certificate there is not this tunnel's" % port
    return None


def probe_tunnel(record, address):
    """{port: None or the reason it failed} for every service, probed in parallel."""
    services = list(zip(record["protocols"], record["ports"]))
    workers = max(1, min(PROBE_MAX_PARALLEL, len(services)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="probe") as pool:
        futures = {port: pool.submit(probe_port, address, port, protocol, record["fqdn"],
                                     record.get("cert_sha256", []))
                   for protocol, port in services}
    return {port: future.result() for port, future in futures.items()}


def probe_outcome(record, address, settings):
    """(status, {port: ok}, reason): "direct" when every port answered at address."""
    if is_own_address(address, settings):
        return "relayed", {}, ("%s is this server's own address (the pod runs on the"
                               " server's host or its network): not probed" % address)
    failures = probe_tunnel(record, address)
    ports = {str(port): failure is None for port, failure in failures.items()}
    reasons = [failure for failure in failures.values() if failure]
    return ("relayed" if reasons else "direct"), ports, "; ".join(reasons) or None


def body_address(body, key, version=None):
    """An IP address string from the check's JSON body, "" when absent; 400 if bad."""
    value = field(body, key).strip()
    if not value:
        return ""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise UsageError("%s is not an IP address" % key) from None
    if version and ip.version != version:
        raise UsageError("%s must be an IPv%d address" % (key, version))
    return str(ip)


def check_reachability(settings, store, record, observed, body):
    """POST /tunnels/<id>/check: probe the address the request came from,
    keep the outcome as record["reach"], return it (body: see above)."""
    if tunnel_status(record) != "online":
        raise Expired("tunnel %s expired" % record["fqdn"])
    external, lan = body_address(body, "external_address"), body_address(body, "lan_address", 4)
    address = plain_address(observed)
    status, ports, reason = probe_outcome(record, address, settings)
    cgnat = bool(external) and external != address
    if cgnat:
        reason = ("carrier-grade NAT: the router's external address %s is not the address"
                  " the server sees (%s); %s" % (external, address, reason or "ports answered"))
    reach = {"status": status, "address": address, "lan_address": lan or None,
             "cgnat": cgnat, "ports": ports, "checked_at": int(time.time()), "reason": reason}
    store.update(record["id"], reach=reach)
    log.info("reachability checked tunnel=%s address=%s status=%s cgnat=%s reason=%s",
             record["id"], address, status, str(cgnat).lower(), reason)
    return dict(reach, id=record["id"], fqdn=record["fqdn"])


def recheck_direct(settings, store, record, now):
    """dns-refresh: probe a tunnel found direct at its recorded address again;
    mark it relayed when a port stopped answering. Returns a change line or None."""
    reach = record.get("reach") or {}
    if reach.get("status") != "direct" or tunnel_status(record, now) != "online":
        return None
    status, ports, reason = probe_outcome(record, reach["address"], settings)
    if status == "direct":
        return None
    store.update(record["id"], reach=dict(reach, status=status, ports=ports,
                                          checked_at=int(now), reason=reason))
    log.info("tunnel no longer direct tunnel=%s address=%s reason=%s",
             record["id"], reach["address"], reason)
    return "relayed %s (was direct at %s: %s)" % (record["fqdn"], reach["address"], reason)


# =====================================================================
# DNS — what each tunnel's name answers (from its reachability), and the
# built-in authoritative responder on DNS_PORT; used by the wiring, by
# `dns-refresh` and by DNSIMPLE. ACME DNS-01 publishes its TXT values
# with BuiltinDns.set_txt(name, values) (DnsimpleProvider.set_txt alike).
# =====================================================================
#
# Split horizon: a client asking from the router's own public address gets
# the pod's LAN address (routers without hairpin NAT), if the pod gave one.
#
# The built-in responder (DnsZone answers, DnsResponder moves packets):
#
# | name                    | records                                        |
# |-------------------------|------------------------------------------------|
# | the domain (apex)       | SOA, NS, A/AAAA of the server, TXT (txt_lookup)|
# | ns.<domain>             | A/AAAA of the server, TXT                      |
# | a tunnel FQDN           | A/AAAA from lookup (split horizon), TXT        |
# | a name with TXT only    | TXT (ACME DNS-01 `_acme-challenge.<fqdn>`)     |
# | any other name below    | NXDOMAIN, SOA in authority                     |
# | existing, type missing  | NOERROR without answers (NODATA), SOA          |
# | outside the domain      | REFUSED (not authoritative, no records)        |
#
# - ANY gets the A and AAAA records of the name; a name without addresses
#   gets the synthesized `HINFO "RFC8482" ""` of RFC 8482 section 4.2.
#   AXFR and IXFR are REFUSED: there is no zone transfer.
# - Split horizon keys are the query's source, or a full /32 IPv4 EDNS
#   Client Subnet (ECS) address from a resolver listed in
#   DNS_CLIENT_SUBNET_FROM (from anyone else the option is ignored and not
#   echoed, as a server without ECS would); AAAA answers are never split.
#   An honoured option is echoed with scope /32 for such names, /0 otherwise.
# - Size: UDP answers fit 512 bytes without EDNS0, else min(client's size,
#   our 1232); a larger one is sent with TC set and its records dropped, so
#   the client retries over TCP. TCP answers fit 65535. Names in answers
#   are not compressed (the answers are small).
# - Abuse: UDP answers rate limited per source prefix (DNS_RATE_LIMIT,
#   DNS_RATE_SLIP: RateLimiter), UDP reads and TCP threads capped (DnsResponder).
# - Unknown names are decided by the callbacks alone: an empty non-terminal
#   gets NXDOMAIN.

DNS_TTL_S = 60                     # of every tunnel record, both providers


# ---- what a tunnel's name answers -----------------------------------------
def server_addresses(settings):
    """The server's own addresses for DNS: PUBLIC_ADDRESS, else a specific
    LISTEN_ADDRESS, else 127.0.0.1 for a *.localhost domain (or none)."""
    if settings.public_address:
        return list(settings.public_address)
    if settings.listen_address not in ("0.0.0.0", "::"):
        return [settings.listen_address]
    if settings.tunnel_domain == "localhost" or settings.tunnel_domain.endswith(".localhost"):
        return ["127.0.0.1"]
    return []


def by_family(addresses):
    """(IPv4 addresses, IPv6 addresses) of a list of address strings."""
    return [a for a in addresses if ":" not in a], [a for a in addresses if ":" in a]


def tunnel_answers(record, settings):
    """(ipv4, ipv6, split) for a tunnel's name: the router's address in its
    family when the last check said direct, the server's addresses otherwise;
    split maps the router's address to the pod's LAN address."""
    ipv4, ipv6 = by_family(server_addresses(settings))
    reach = record.get("reach") or {}
    if reach.get("status") != "direct" or not reach.get("address"):
        return ipv4, ipv6, None
    if ":" in reach["address"]:
        return ipv4, [reach["address"]], None
    lan = reach.get("lan_address")
    return [reach["address"]], ipv6, ({reach["address"]: [lan]} if lan else None)


def dns_wanted(records, settings, now):
    """{(fqdn, "A"|"AAAA"): [addresses]} that every online tunnel should answer."""
    answers = [(record["fqdn"], tunnel_answers(record, settings)) for record in records
               if tunnel_status(record, now) == "online"]
    return {(fqdn, rtype): sorted(addresses) for fqdn, (ipv4, ipv6, _) in answers
            for rtype, addresses in (("A", ipv4), ("AAAA", ipv6)) if addresses}


# ---- the built-in responder: wire format ------------------------------------

DNS_HEADER_BYTES = 12
DNS_PLAIN_UDP_BYTES = 512          # RFC 1035 limit for UDP without EDNS0
DNS_EDNS_UDP_BYTES = 1232          # our EDNS0 payload size (DNS flag day 2020)
DNS_MAX_MESSAGE_BYTES = 65535      # what the TCP length prefix can carry
DNS_MAX_QUERY_BYTES = 4096         # read of one UDP datagram
DNS_MAX_TXT_BYTES = 4096           # one TXT value; ACME values are 43 bytes
DNS_SOA_TIMERS_S = (3600, 600, 604800)   # refresh, retry, expire

DNS_A, DNS_NS, DNS_SOA, DNS_HINFO, DNS_TXT, DNS_AAAA, DNS_OPT = 1, 2, 6, 13, 16, 28, 41
DNS_IXFR, DNS_AXFR, DNS_ANY = 251, 252, 255
DNS_IN = 1
DNS_NOERROR, DNS_FORMERR, DNS_SERVFAIL, DNS_NXDOMAIN, DNS_NOTIMP, DNS_REFUSED = 0, 1, 2, 3, 4, 5
DNS_BADVERS_HIGH = 1                  # BADVERS (16) >> 4, carried in the OPT TTL
DNS_QR, DNS_AA, DNS_TC, DNS_RD, DNS_OPCODE, DNS_DO = 0x8000, 0x0400, 0x0200, 0x0100, 0x7800, 0x8000
DNS_ECS_OPTION, DNS_ECS_BITS = 8, {1: 32, 2: 128}
DNS_HINFO_RFC8482 = b"\x07RFC8482\x00"
DNS_PLAIN_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
DNS_NO_RECORDS = ([], [], [])

DnsTunnelRecord = collections.namedtuple("DnsTunnelRecord", "ipv4 ipv6 split")
DnsTunnelRecord.__doc__ = """What `DnsZone.lookup` returns for a tunnel FQDN: ipv4 and
ipv6 address strings answered for A and AAAA; split None, or a dict mapping a
client's public IPv4 to the LAN IPv4 addresses answered to it instead."""

DnsQuery = collections.namedtuple("DnsQuery", "qid flags labels qtype qclass edns")
DnsEdns = collections.namedtuple("DnsEdns", "udp_bytes version do ecs")
DnsEcs = collections.namedtuple("DnsEcs", "family source address")


class DnsFormatError(ValueError):
    """A query that breaks the wire format; `DnsZone.answer` turns it into FORMERR."""


def read_name(packet, offset):
    """Return (labels as sent, offset after the name). A compression pointer
    must point below every byte of the name read so far (no loops, nothing
    forward, no counter needed); DnsFormatError for that, a truncated name, a
    label over 63 bytes (or a reserved label type) and a name over 255."""
    labels, end, floor, size = [], None, offset, 1
    while True:
        length = packet[offset] if offset < len(packet) else -1
        if length >= 0xC0 and offset + 1 < len(packet):
            target = (length & 0x3F) << 8 | packet[offset + 1]
            if target >= floor:
                raise DnsFormatError("compression pointer loops or points forward")
            end = offset + 2 if end is None else end
            offset = floor = target
            continue
        if length == 0:
            return labels, (offset + 1 if end is None else end)
        size += length + 1
        if not 0 < length <= 63 or size > 255 or offset + 1 + length > len(packet):
            raise DnsFormatError("bad label, name over 255 bytes, or past the end")
        labels.append(bytes(packet[offset + 1:offset + 1 + length]))
        offset += 1 + length


def read_options(rdata):
    """The DnsEcs of an OPT record's options (RFC 7871 section 6), or None;
    other options are ignored. DnsFormatError for a truncated option or a
    second ECS, or an ECS that breaks RFC 7871 (a query's scope is 0)."""
    ecs, offset = None, 0
    while offset < len(rdata):
        # a cut-off option header is padded to a length that fails the check below
        code, length = struct.unpack_from("!HH", rdata.ljust(offset + 4, b"\xff"), offset)
        body, offset = rdata[offset + 4:offset + 4 + length], offset + 4 + length
        if offset > len(rdata) or code == DNS_ECS_OPTION and (ecs is not None or len(body) < 4):
            raise DnsFormatError("truncated EDNS option, or a second client subnet")
        if code != DNS_ECS_OPTION:
            continue
        family, source, scope = struct.unpack_from("!HBB", body)
        address = bytes(body[4:])
        if source > DNS_ECS_BITS.get(family, -1) or scope or len(address) != (source + 7) // 8 \
                or source % 8 and address[-1] & (0xFF >> (source % 8)):
            raise DnsFormatError("client subnet family, prefix, scope or address invalid")
        ecs = DnsEcs(family, source, address)
    return ecs


def parse_query(packet):
    """The DnsQuery of a message whose header says QUERY. DnsFormatError unless
    it holds one complete question (not OPT) and well-formed records after
    it, with at most one OPT, owned by the root (RFC 6891 section 6.1.1);
    bytes after the last record are ignored."""
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", packet)
    if qdcount != 1:
        raise DnsFormatError("a query must hold exactly one question")
    labels, offset = read_name(packet, DNS_HEADER_BYTES)
    qtype, qclass = struct.unpack_from("!HH", packet.ljust(offset + 4, b"\0"), offset)
    if offset + 4 > len(packet) or qtype == DNS_OPT:
        raise DnsFormatError("question truncated, or of type OPT")
    edns, offset = None, offset + 4
    for index in range(ancount + nscount + arcount):
        owner, offset = read_name(packet, offset)
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", packet.ljust(offset + 10), offset)
        rdata, offset = packet[offset + 10:offset + 10 + rdlength], offset + 10 + rdlength
        if offset > len(packet):
            raise DnsFormatError("record runs past the end of the message")
        if rtype == DNS_OPT and index >= ancount + nscount:
            if edns is not None or owner:
                raise DnsFormatError("second OPT record, or OPT not owned by the root")
            edns = DnsEdns(max(rclass, DNS_PLAIN_UDP_BYTES), (ttl >> 16) & 0xFF,
                         bool(ttl & DNS_DO), read_options(rdata))
    return DnsQuery(qid, flags, labels, qtype, qclass, edns)


def name_bytes(labels):
    """A name in wire format, never compressed (our answers are small)."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def resource_record(owner, rtype, ttl, rdata):
    """One IN resource record in wire format."""
    return name_bytes(owner) + struct.pack("!HHIH", rtype, DNS_IN, ttl, len(rdata)) + rdata


def header_only(qid, flags, rcode):
    """A response made of a header alone (FORMERR, NOTIMP, SERVFAIL)."""
    return struct.pack("!6H", qid, DNS_QR | (flags & (DNS_OPCODE | DNS_RD)) | rcode, 0, 0, 0, 0)


def opt_record(edns, udp_bytes, ext_rcode, scope):
    """Our OPT answering the query's `edns`: our UDP size, DO copied (RFC
    3225), an honoured Client Subnet echoed with `scope` (RFC 7871 7.2.1)."""
    ecs, options = edns.ecs, b""
    if ecs is not None:
        options = struct.pack("!HHHBB", DNS_ECS_OPTION, 4 + len(ecs.address), ecs.family,
                              ecs.source, scope) + ecs.address
    ttl = ext_rcode << 24 | (DNS_DO if edns.do else 0)
    return b"\0" + struct.pack("!HHIH", DNS_OPT, udp_bytes, ttl, len(options)) + options


def build_response(query, rcode, flags, sections, opt):
    """The response: header, the question as asked, the three sections
    (lists of records in wire format), then `opt` (b"" for none)."""
    answers, authority, additional = sections
    flags |= DNS_QR | (query.flags & (DNS_OPCODE | DNS_RD)) | rcode
    header = struct.pack("!6H", query.qid, flags, 1, len(answers), len(authority),
                         len(additional) + (1 if opt else 0))
    question = name_bytes(query.labels) + struct.pack("!HH", query.qtype, query.qclass)
    return header + question + b"".join(answers + authority + additional) + opt


def address_records(ipv4, ipv6):
    """{DNS_A: [record data], DNS_AAAA: [...]} of address strings; a bad one is logged, skipped."""
    node = {DNS_A: [], DNS_AAAA: []}
    for rtype, family, texts in ((DNS_A, socket.AF_INET, ipv4), (DNS_AAAA, socket.AF_INET6, ipv6)):
        for text in texts or ():
            try:
                node[rtype].append(socket.inet_pton(family, text))
            except (OSError, TypeError):
                log.warning("dns skips bad address address=%r", text)
    return node


def txt_data(texts):
    """TXT record data, one record per text in 255-byte character-strings;
    a text over DNS_MAX_TXT_BYTES is logged and skipped."""
    found = []
    for data in (text.encode("utf-8") for text in texts):
        if len(data) > DNS_MAX_TXT_BYTES:
            log.warning("dns skips oversized txt bytes=%d", len(data))
            continue
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        found.append(b"".join(bytes([len(chunk)]) + chunk for chunk in chunks))
    return found


def labels_of(name):
    """The lowercased labels of a dotted name; ValueError unless a host name
    (labels may hold '_', as `_acme-challenge` does)."""
    text = name.strip().rstrip(".").lower()
    if not is_hostname(text, underscores=True):
        raise ValueError("not a valid DNS name: %r" % name)
    return tuple(text.encode("ascii").split(b"."))


# ---- the zone: what a query gets ---------------------------------------------

class DnsZone:
    """The authoritative data for one domain, answering query bytes.
    `lookup(name)` gets a lowercased FQDN strictly below the domain, other
    than ns.<domain>, and returns a DnsTunnelRecord (or None: no such tunnel);
    `txt_lookup(name)` gets any lowercased name in the domain and returns
    its TXT strings. Both must not block, may run in several threads at once
    and see only names of letters, digits, '-' and '_'. ECS counts only from
    `subnet_resolvers` (networks). `serial` (bump it when records change)
    and the other attributes may be changed between calls."""

    def __init__(self, domain, lookup, txt_lookup, server_ipv4=(), server_ipv6=(), ttl_s=60,
                 serial=1, subnet_resolvers=()):
        self.domain_labels = labels_of(domain)
        self.domain = b".".join(self.domain_labels).decode("ascii")
        self.ns_labels = (b"ns",) + self.domain_labels
        for text in list(server_ipv4) + list(server_ipv6):
            ipaddress.ip_address(text)  # refuse a bad server address at start
        self.server_ipv4, self.server_ipv6 = list(server_ipv4), list(server_ipv6)
        self.ttl_s, self.serial = int(ttl_s), int(serial)
        self.lookup, self.txt_lookup = lookup, txt_lookup
        self.subnet_resolvers = [ipaddress.ip_network(n, strict=False) for n in subnet_resolvers]

    def answer(self, packet, client_ip, max_udp=DNS_EDNS_UDP_BYTES, slip=False):
        """The response to query `packet` from `client_ip`, or None to send nothing
        (shorter than a header, or a response). max_udp: our UDP payload size,
        None over TCP; slip: a bare truncated answer (the rate limiter's).
        Never raises: a malformed query gets FORMERR, an opcode other than
        QUERY NOTIMP, a failure in answering (a failing callback) SERVFAIL."""
        if len(packet) < DNS_HEADER_BYTES or packet[2] & 0x80:
            return None
        qid, flags = struct.unpack_from("!HH", packet)
        if flags & DNS_OPCODE:
            return header_only(qid, flags, DNS_NOTIMP)
        try:
            query = parse_query(packet)
            if slip:
                return build_response(query, DNS_NOERROR, DNS_TC, DNS_NO_RECORDS, b"")
            return self.respond(query, plain_address(client_ip), max_udp)
        except DnsFormatError:
            return header_only(qid, flags, DNS_FORMERR)
        except Exception:  # per-query boundary: one bad query must not stop DNS
            log.exception("dns answer failed peer=%s", client_ip)
            return header_only(qid, flags, DNS_SERVFAIL)

    def respond(self, query, client_ip, max_udp):
        """The response to a parsed query, within its size (RFC 6891 section 6.2.5)."""
        edns, udp_bytes = query.edns, max_udp or DNS_EDNS_UDP_BYTES
        if edns is not None and edns.ecs is not None and not any(
                ipaddress.ip_address(client_ip) in net for net in self.subnet_resolvers):
            edns = edns._replace(ecs=None)
        if edns is not None and edns.version != 0:
            return build_response(query, DNS_NOERROR, 0, DNS_NO_RECORDS,
                                  opt_record(edns, udp_bytes, DNS_BADVERS_HIGH, 0))
        ecs = edns and edns.ecs
        keys = [socket.inet_ntoa(ecs.address)] if ecs and (ecs.family, ecs.source) == (1, 32) else []
        rcode, flags, sections, split = self.resolve(query, keys + [client_ip])
        opt = opt_record(edns, udp_bytes, 0, 32 if split and ecs and ecs.family == 1 else 0) \
            if edns is not None else b""
        response = build_response(query, rcode, flags, sections, opt)
        limit = DNS_MAX_MESSAGE_BYTES if max_udp is None else DNS_PLAIN_UDP_BYTES \
            if edns is None else max(DNS_PLAIN_UDP_BYTES, min(edns.udp_bytes, max_udp))
        if len(response) <= limit:
            return response
        return build_response(query, rcode, flags | DNS_TC, DNS_NO_RECORDS, opt)

    def resolve(self, query, client_keys):
        """(rcode, flags, sections, split) of a query; split: the answer
        depends on the client's address."""
        relative = self.relative_labels(tuple(label.lower() for label in query.labels))
        if relative is None or query.qclass != DNS_IN or query.qtype in (DNS_AXFR, DNS_IXFR):
            return DNS_REFUSED, 0, DNS_NO_RECORDS, False
        node, split = self.node_of(relative, client_keys)
        negative = ([], [resource_record(self.domain_labels, DNS_SOA, self.ttl_s, self.soa_data())], [])
        if node is None:
            return DNS_NXDOMAIN, DNS_AA, negative, False
        wanted = [DNS_A, DNS_AAAA] if query.qtype == DNS_ANY else [query.qtype]
        answers = [resource_record(query.labels, rtype, self.ttl_s, rdata)
                   for rtype in wanted for rdata in node.get(rtype, [])]
        if query.qtype == DNS_ANY and not answers:
            answers = [resource_record(query.labels, DNS_HINFO, self.ttl_s, DNS_HINFO_RFC8482)]
        if not answers:
            return DNS_NOERROR, DNS_AA, negative, split
        servers = address_records(self.server_ipv4, self.server_ipv6)
        glue = [resource_record(self.ns_labels, rtype, self.ttl_s, rdata)
                for rtype, records in servers.items() for rdata in records] \
            if query.qtype == DNS_NS else []
        return DNS_NOERROR, DNS_AA, (answers, [], glue), split

    def relative_labels(self, lowered):
        """The labels in front of the domain; None outside the domain."""
        cut = len(lowered) - len(self.domain_labels)
        return lowered[:cut] if cut >= 0 and lowered[cut:] == self.domain_labels else None

    def node_of(self, relative, client_keys):
        """({rtype: [record data]}, split) of an in-domain name, (None, False)
        if it does not exist."""
        if not all(DNS_PLAIN_LABEL_BYTES.issuperset(label) for label in relative):
            return None, False
        name = b".".join(relative + self.domain_labels).decode("ascii")
        node, split = None, {}
        if relative in ((), (b"ns",)):  # the apex and ns.<domain>: the server's addresses
            node = address_records(self.server_ipv4, self.server_ipv6)
            if not relative:
                node.update({DNS_SOA: [self.soa_data()], DNS_NS: [name_bytes(self.ns_labels)]})
        else:
            record = self.lookup(name)
            if record is not None:
                split = record.split or {}
                ipv4 = next((split[key] for key in client_keys if key in split), record.ipv4)
                node = address_records(ipv4, record.ipv6)
        texts = self.txt_lookup(name)
        if texts:
            node = {**(node or {}), DNS_TXT: txt_data(texts)}
        return node, bool(split)

    def soa_data(self):
        """The apex SOA's data; its minimum (the negative TTL) is ttl_s."""
        timers = struct.pack("!5I", self.serial & 0xFFFFFFFF, *DNS_SOA_TIMERS_S, self.ttl_s)
        return name_bytes(self.ns_labels) + name_bytes((b"hostmaster",) + self.domain_labels) + timers


# ---- the responder: UDP on the loop, TCP in capped threads --------------------

class RateLimiter:
    """Response rate limiting per source prefix (IPv4 /24, IPv6 /56, as BIND's
    RRL): `rate` answers per second (and a burst of as many) to a prefix;
    past that every `slip`th query gets a bare answer with TC set, so a real
    resolver retries over TCP (a forged source cannot), the others nothing.
    slip 0: nothing at all; rate 0: no limit. Used by the loop thread only."""

    TABLE_SIZE = 10000             # source prefixes remembered, the most recent
    ANSWER, SLIP, DROP = "answer", "slip", "drop"

    def __init__(self, rate, slip):
        self.rate, self.slip = rate, slip
        self.buckets = collections.OrderedDict()   # prefix -> (tokens, at, queries over)

    def judge(self, address, now):
        """ANSWER, SLIP or DROP for one query from `address` at monotonic `now`."""
        if not self.rate:
            return self.ANSWER
        key = source_prefix(address, 24, 56)
        tokens, at, over = self.buckets.pop(key, (self.rate, now, 0))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        if len(self.buckets) >= self.TABLE_SIZE:
            self.buckets.popitem(last=False)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now, over)
            return self.ANSWER
        self.buckets[key] = (tokens, now, over + 1)
        return self.SLIP if self.slip and (over + 1) % self.slip == 0 else self.DROP


class DnsResponder:
    """Serves a DnsZone on UDP and TCP at (address, port) (0: a free port for
    both, in `.port`) through the server's EventLoop; built and closed in the
    loop thread; never raises for network or packet trouble. UDP is read in
    bounded turns and slices, so a flood waits or overflows in the kernel
    while tunnels keep their turns and the CPU; TCP connections get threads
    from SourceShares (a source's newest connection ends its oldest) and a
    deadline per whole query however slowly bytes trickle. The limits are
    class attributes (per instance too)."""

    UDP_PER_TURN = 4               # datagrams answered per loop turn: tunnels keep theirs
    UDP_PER_S = 10000              # datagrams read per second in all; more wait in the kernel
    UDP_SLICE_S = 0.01             # ... counted in slices this long
    TCP_MAX_CLIENTS = 64
    TCP_PER_SOURCE = 4             # of those, per IPv4 address or IPv6 /64
    TCP_QUERY_DEADLINE_S = 5.0     # to receive one whole query and send its answer

    def __init__(self, zone, loop, address="0.0.0.0", port=53, limiter=None):
        self.zone, self.loop, self.limiter = zone, loop, limiter or RateLimiter(0, 0)
        for attempt in range(16):  # port 0: until the UDP port is also free for TCP
            self.udp = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                     socket.SOCK_DGRAM)
            try:
                self.udp.bind((address, port))
                tcp = bind_listener(address, self.udp.getsockname()[1])
                break
            except (OSError, Unavailable) as exc:
                self.udp.close()
                if port or attempt == 15:
                    raise Unavailable("cannot serve DNS on %s port %s: %s" % (
                        address, port, getattr(exc, "strerror", None) or exc)) from None
        self.port, self.closed = self.udp.getsockname()[1], False
        self.slice_end, self.slice_left = 0.0, 0
        self.shares = SourceShares(self.TCP_MAX_CLIENTS, self.TCP_PER_SOURCE)
        self.udp.setblocking(False)
        loop.watch(self.udp, EVENT_READ, self.on_udp)
        self.listener = Listener(loop, tcp, self.on_tcp_accept, "dns")

    def on_udp(self, _mask=None):
        """Answer at most UDP_PER_TURN waiting datagrams, as the limiter says;
        past the slice's share, stop watching the socket until the next slice."""
        now = time.monotonic()
        if self.closed:
            return
        if now >= self.slice_end:
            self.slice_end = now + self.UDP_SLICE_S
            self.slice_left = max(1, int(self.UDP_PER_S * self.UDP_SLICE_S))
            self.loop.watch(self.udp, EVENT_READ, self.on_udp)
        elif self.slice_left <= 0:
            self.loop.watch(self.udp, 0)
            self.loop.call_later(self.slice_end - now, self.on_udp)
            return
        for _ in range(min(self.UDP_PER_TURN, self.slice_left)):
            self.slice_left -= 1
            try:
                packet, peer = self.udp.recvfrom(DNS_MAX_QUERY_BYTES)
                verdict = self.limiter.judge(peer[0], time.monotonic())
                response = None if verdict == RateLimiter.DROP else self.zone.answer(
                    packet, peer[0], DNS_EDNS_UDP_BYTES, verdict == RateLimiter.SLIP)
                if response is not None:
                    self.udp.sendto(response, peer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("dns udp failed error=%s", exc)

    def on_tcp_accept(self, sock, address):
        """Listener callback: a thread for the connection if `shares` gives it
        a slot (it may end an older one), else it is closed at once."""
        if self.closed or not self.shares.take(sock, source_prefix(address[0], 32, 64)):
            log.debug("dns tcp refused, slots taken peer=%s", address[0])
            return sock.close()
        threading.Thread(target=self.serve_tcp, args=(sock, address[0]),
                         name="dns-tcp", daemon=True).start()

    def serve_tcp(self, sock, peer):
        """Thread body: answer whole queries in turn until EOF, a deadline,
        garbage or close(); then give the slot back."""
        try:
            sock.setblocking(True)
            while True:
                deadline = time.monotonic() + self.TCP_QUERY_DEADLINE_S
                (length,) = struct.unpack("!H", recv_exactly(sock, 2, deadline))
                if length < DNS_HEADER_BYTES:
                    raise ProtocolError("a %d-byte frame is shorter than a header" % length)
                response = self.zone.answer(recv_exactly(sock, length, deadline), peer, None)
                if response is not None:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock.sendall(struct.pack("!H", len(response)) + response)
        except (OSError, ProtocolError) as exc:
            log.debug("dns tcp closed peer=%s reason=%s", peer, exc)
        finally:
            self.shares.leave(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.close()

    def close(self):
        """Close both sockets and end every TCP connection; twice is fine."""
        if not self.closed:
            self.closed = True
            self.loop.watch(self.udp, 0)
            self.udp.close()
            self.listener.close()
            with self.shares.lock:
                held = list(self.shares.holders)
            for sock in held:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# ---- builtin provider: the zone fed from the store ----------------------------

class BuiltinDns:
    """The DnsZone of TUNNEL_DOMAIN and its DnsResponder on DNS_PORT,
    answering every online tunnel from the store. Its tables change one dict
    operation at a time (each is atomic), and answering threads read them
    with one get each: no lock."""

    def __init__(self, settings, store):
        self.settings, self.store = settings, store
        ipv4, ipv6 = by_family(server_addresses(settings))
        self.txt = {}               # name -> [strings]
        self.names = {}             # fqdn -> (expires_at, DnsTunnelRecord)
        self.fqdns = {}             # tunnel id -> fqdn in names
        self.zone = DnsZone(settings.tunnel_domain, self.lookup,
                            lambda name: self.txt.get(name, []), ipv4, ipv6, ttl_s=DNS_TTL_S,
                            serial=int(time.time()),
                            subnet_resolvers=settings.dns_client_subnet_from)
        self.responder = None

    def start(self, loop):
        """Bind LISTEN_ADDRESS:DNS_PORT (UDP and TCP), serve through `loop`; the port."""
        s = self.settings
        self.responder = DnsResponder(self.zone, loop, s.listen_address, s.dns_port,
                                      RateLimiter(s.dns_rate_limit, s.dns_rate_slip))
        self.refresh()
        return self.responder.port

    def set_txt(self, name, values):
        """Any thread: answer TXT `values` (strings) for `name` from now on
        (ACME DNS-01); [] clears them. ValueError for a name outside TUNNEL_DOMAIN."""
        labels = labels_of(name)
        if self.zone.relative_labels(labels) is None:
            raise ValueError("%s is not in %s" % (name, self.zone.domain))
        name = b".".join(labels).decode("ascii")
        if values:
            self.txt[name] = [str(value) for value in values]
        else:
            self.txt.pop(name, None)

    def refresh(self, tunnel_id=None):
        """Loop thread: follow the store for one tunnel after its change (None:
        every tunnel); the SOA serial moves when an answer changed."""
        now, changed = time.time(), False
        ids = [tunnel_id] if tunnel_id is not None else \
            set(self.fqdns) | {record["id"] for record in self.store.all()}
        for each in ids:
            record = self.store.get(each)
            old = self.names.pop(self.fqdns.pop(each, None), None)
            new = None
            if record is not None and tunnel_status(record, now) == "online":
                new = self.names[record["fqdn"]] = (
                    record["expires_at"], DnsTunnelRecord(*tunnel_answers(record, self.settings)))
                self.fqdns[each] = record["fqdn"]
            changed = changed or old != new
        if changed:
            self.zone.serial = max(self.zone.serial + 1, int(now))

    def lookup(self, name):
        """The DnsZone callback: the DnsTunnelRecord of an unexpired tunnel FQDN, else None."""
        entry = self.names.get(name)
        return entry[1] if entry and time.time() < entry[0] else None

    def close(self):
        """Stop answering: close the responder's sockets, if it was started."""
        if self.responder is not None:
            self.responder.close()


# =====================================================================
# DNSIMPLE — the tunnels' records in a dnsimple zone through its v2 REST
# API: the client, the provider and the reconciliation thread; used by the
# wiring (DYNAMIC_DNS_SERVICE=dnsimple:...) and `dns-refresh`
# =====================================================================

DNS_RECONCILE_INTERVAL_S = 60.0    # dnsimple: also without any change
DNS_RETRY_FIRST_S = 5.0            # after a failure, doubling up to the interval
DNS_RETRY_MAX_S = 3600.0           # longest wait a rate limit can impose
DNS_OWNED_FILE = "dns_records.json"
DNS_LOCK_FILE = "dns.lock"

DNSIMPLE_TIMEOUT_S = 15
DNSIMPLE_PER_PAGE = 100            # the API's maximum
DNSIMPLE_MAX_PAGES = 1000
DNSIMPLE_MAX_ANSWER_BYTES = 4 * 1024 * 1024


class DnsProviderError(Unavailable):
    """The DNS provider failed or refused; worth retrying later (never fatal
    to the server). `retry_at` (epoch seconds) when a rate limit says when."""

    def __init__(self, message, retry_at=None):
        super().__init__(message)
        self.retry_at = retry_at


class DnsimpleClient:
    """Calls to the dnsimple v2 API under base_url (DNSIMPLE_API_URL): bearer
    token, JSON in and out, pagination, rate-limit headers. Every failure is a
    DnsProviderError with dnsimple's `message`; the token never reaches a log."""

    def __init__(self, base_url, token, account=None):
        self.base_url, self.token, self.account = base_url.rstrip("/"), token, account
        self.rate_remaining = self.rate_reset = None

    def call(self, method, path, body=None, query=None, missing_ok=False):
        """The JSON answer of one request, which holds "data"; None for 204 (and
        404 if missing_ok). None sent while the hour's quota is used up."""
        import urllib.request  # here, not at the top: only dnsimple users need it (server RSS)
        if self.rate_remaining == 0 and self.rate_reset and time.time() < self.rate_reset:
            raise DnsProviderError("dnsimple rate limit used up until %s; %s %s not sent" % (
                time.strftime("%H:%M:%S", time.localtime(self.rate_reset)), method, path),
                self.rate_reset)
        url = "%s/v2%s%s" % (self.base_url, path, "?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, method=method, headers={
            "Authorization": "Bearer " + self.token, "Accept": "application/json",
            "User-Agent": "pipe2me-server"})
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            status, headers, data = http_exchange(request, DNSIMPLE_TIMEOUT_S,
                                                  DNSIMPLE_MAX_ANSWER_BYTES)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DnsProviderError("dnsimple unreachable at %s: %s" % (self.base_url, reason)) from None
        with contextlib.suppress(TypeError, ValueError):
            self.rate_remaining = int(headers.get("X-RateLimit-Remaining"))
            self.rate_reset = int(headers.get("X-RateLimit-Reset"))
        if status == 204 or status == 404 and missing_ok:
            return None
        try:
            answer = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            answer = None
        if status >= 300:
            message = str(answer.get("message"))[:300] if isinstance(answer, dict) else None
            raise DnsProviderError("dnsimple refused %s %s: %d %s" % (
                method, path, status, message or "HTTP %d" % status),
                self.rate_reset if status == 429 else None)
        if not isinstance(answer, dict) or "data" not in answer:
            raise DnsProviderError("dnsimple answered %s %s without data in JSON" % (method, path))
        return answer

    # -- the endpoints --------------------------------------------------
    def account_id(self):
        """The account of DYNAMIC_DNS_SERVICE, or the token's (GET /whoami)."""
        if self.account is None:
            account = (self.call("GET", "/whoami")["data"] or {}).get("account")
            if not isinstance(account, dict) or "id" not in account:
                raise DnsProviderError("this dnsimple token is a user token: give the account"
                                       " as DYNAMIC_DNS_SERVICE=dnsimple:TOKEN:ACCOUNT_ID")
            self.account = str(account["id"])
        return self.account

    def zone_path(self, zone, tail=""):
        """The path of `zone` in the account, then `tail`."""
        return "/%s/zones/%s%s" % (self.account_id(), zone, tail)

    def zone_exists(self, name):
        """Whether the account has the zone `name`."""
        return self.call("GET", self.zone_path(name), missing_ok=True) is not None

    def records(self, zone):
        """Every record of the zone, through all pages."""
        found = []
        for page in range(1, DNSIMPLE_MAX_PAGES + 1):
            answer = self.call("GET", self.zone_path(zone, "/records"),
                               query={"page": page, "per_page": DNSIMPLE_PER_PAGE})
            found += [r for r in answer["data"] if isinstance(r, dict)]
            if page >= int((answer.get("pagination") or {}).get("total_pages") or 1):
                return found
        raise DnsProviderError("dnsimple zone %s has more than %d pages of records"
                               % (zone, DNSIMPLE_MAX_PAGES))

    def create(self, zone, name, rtype, content):
        """Create one record in the zone with DNS_TTL_S; returns it as dnsimple has it."""
        return self.call("POST", self.zone_path(zone, "/records"), {
            "name": name, "type": rtype, "content": content, "ttl": DNS_TTL_S})["data"]

    def update(self, zone, record_id, content):
        """Set one record's content (and DNS_TTL_S); returns it as dnsimple has it."""
        return self.call("PATCH", self.zone_path(zone, "/records/%s" % record_id),
                         {"content": content, "ttl": DNS_TTL_S})["data"]

    def delete(self, zone, record_id):
        """Delete one record of the zone."""
        self.call("DELETE", self.zone_path(zone, "/records/%s" % record_id))


@contextlib.contextmanager
def dns_state_lock(state_dir):
    """Held around a reconciliation: the server's thread and a `dns-refresh`
    from cron never edit the records (and DNS_OWNED_FILE) at the same time."""
    fd = os.open(os.path.join(state_dir, DNS_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class DnsimpleProvider:
    """Makes the A/AAAA records of the tunnels in a dnsimple zone match what
    they should answer, changing only what differs and touching only records
    it created itself (their ids live in STATE_DIR/DNS_OWNED_FILE). The zone
    is TUNNEL_DOMAIN or the nearest parent dnsimple has. Blocking: run it off
    the loop thread."""

    def __init__(self, settings):
        token, account = (settings.dynamic_dns_service.split(":") + [""])[1:3]  # TOKEN[:ACCOUNT]
        self.client = DnsimpleClient(settings.dnsimple_api_url, token, account or None)
        self.domain, self.state_dir = settings.tunnel_domain, settings.state_dir
        self.owned_path = os.path.join(settings.state_dir, DNS_OWNED_FILE)
        self.zone = None

    def reconcile(self, wanted):
        """wanted: {(fqdn, "A"|"AAAA"): [addresses]}; our A/AAAA records not
        in it are deleted. Returns one line per change made."""
        return self.apply(wanted, ("A", "AAAA"))

    def set_txt(self, fqdn, values):
        """Make our TXT records of fqdn hold exactly `values` (strings), e.g.
        ACME DNS-01's `_acme-challenge.<name>`; [] deletes them. Blocking;
        returns one line per change; reconcile() leaves them alone."""
        return self.apply({(fqdn.strip().rstrip(".").lower(), "TXT"): list(values)}, ())

    def apply(self, wanted, rtypes):
        """Converge every key of `wanted` and every record of ours whose type
        is in rtypes, under the lock; log and return the changes."""
        with dns_state_lock(self.state_dir):
            zone = self.find_zone()
            owned = self.load_owned()
            mine = self.owned_records(zone, owned)
            changes = []
            for key in sorted(set(wanted) | {key for key in mine if key[1] in rtypes}):
                changes += self.converge(zone, key, wanted.get(key, []), mine.get(key, []), owned)
        for line in changes:
            log.info("dns record %s", line)
        return changes

    def find_zone(self):
        """The dnsimple zone that holds TUNNEL_DOMAIN (the nearest parent), found once."""
        if self.zone is None:
            labels = self.domain.split(".")
            names = [".".join(labels[start:]) for start in range(max(1, len(labels) - 1))]
            self.zone = next((name for name in names if self.client.zone_exists(name)), None)
        if self.zone is None:
            raise DnsProviderError("no dnsimple zone holds %s in account %s" % (
                self.domain, self.client.account_id()))
        return self.zone

    def load_owned(self):
        """{record id: {fqdn, type}} of the records pipe2me created."""
        try:
            return read_json(self.owned_path).get("records", {})
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DnsProviderError("cannot read %s: %s" % (self.owned_path, exc)) from None

    def save_owned(self, owned):
        """Write the ids of the records pipe2me created to DNS_OWNED_FILE."""
        write_json(self.owned_path, {"version": STATE_VERSION, "zone": self.zone,
                                     "records": owned}, 0o600)

    def owned_records(self, zone, owned):
        """{(fqdn, type): [remote records]} of ours that still exist; ids of
        records removed by someone else are forgotten."""
        mine = {}
        for record in self.client.records(zone):
            if str(record.get("id")) in owned and record.get("type") in ("A", "AAAA", "TXT"):
                fqdn = "%s.%s" % (record["name"], zone) if record.get("name") else zone
                mine.setdefault((fqdn, record["type"]), []).append(record)
        gone = set(owned) - {str(r["id"]) for records in mine.values() for r in records}
        if gone:
            log.warning("dns records gone from dnsimple, forgotten ids=%s", ",".join(sorted(gone)))
            for record_id in gone:
                del owned[record_id]
            self.save_owned(owned)
        return mine

    def converge(self, zone, key, contents, records, owned):
        """Make our records of one (fqdn, type) hold exactly `contents`."""
        fqdn, rtype = key
        keep = {}
        for record in records:
            if record.get("content") in contents and record["content"] not in keep:
                keep[record["content"]] = record
        spare = [r for r in records if r not in keep.values()]
        changes = []
        for content, record in keep.items():
            if record.get("ttl") != DNS_TTL_S:
                self.client.update(zone, record["id"], content)
                changes.append("updated %s %s %s ttl=%d" % (rtype, fqdn, content, DNS_TTL_S))
        for content in [c for c in contents if c not in keep]:
            if spare:  # a spare record of ours is pointed at it
                record = spare.pop(0)
                self.client.update(zone, record["id"], content)
                changes.append("updated %s %s %s (was %s)" % (rtype, fqdn, content,
                                                              record.get("content")))
                continue
            created = self.client.create(zone, fqdn[:-len(zone) - 1] if fqdn != zone else "",
                                         rtype, content)
            owned[str(created["id"])] = {"fqdn": fqdn, "type": rtype}
            self.save_owned(owned)
            changes.append("created %s %s %s" % (rtype, fqdn, content))
        for record in spare:
            self.client.delete(zone, record["id"])
            del owned[str(record["id"])]
            self.save_owned(owned)
            changes.append("deleted %s %s %s" % (rtype, fqdn, record.get("content")))
        return changes


# ---- reconciliation off the loop thread --------------------------------------

class DnsReconciler:
    """Runs provider.reconcile(wanted()) in its own thread: soon after each
    trigger() (a store change) and every DNS_RECONCILE_INTERVAL_S. A failure
    is logged and retried after DNS_RETRY_FIRST_S, doubling up to the
    interval, or when a rate limit says; it never stops the server."""

    def __init__(self, provider, wanted):
        self.provider, self.wanted = provider, wanted
        self.wake = threading.Event()
        self.stopping = False
        self.failures = 0
        self.thread = threading.Thread(target=self.run, name="dns-reconcile", daemon=True)

    def start(self):
        """Start the reconciliation thread."""
        self.thread.start()

    def trigger(self):
        """Ask for a reconciliation soon (a store change)."""
        self.wake.set()

    def stop(self):
        """Make the thread end at its next wake-up."""
        self.stopping = True
        self.wake.set()

    def run(self):
        """The thread: reconcile when due or triggered, holding off while backing off."""
        due = time.monotonic()
        while not self.stopping:
            woke = self.wake.wait(max(0.0, due - time.monotonic()))
            self.wake.clear()
            if self.stopping:
                return
            if woke and self.failures and time.monotonic() < due:
                continue  # a change while backing off (or rate limited): run when the wait is over
            due = time.monotonic() + self.attempt()

    def attempt(self):
        """One reconciliation; returns the seconds until the next one."""
        try:
            self.provider.reconcile(self.wanted())
            self.failures = 0
            return DNS_RECONCILE_INTERVAL_S
        except Exception as exc:  # thread boundary: a bug is logged, DNS goes on later
            if not isinstance(exc, DnsProviderError):
                log.exception("dns update failed with a bug")
            self.failures += 1
            delay = min(DNS_RECONCILE_INTERVAL_S, DNS_RETRY_FIRST_S * 2 ** (self.failures - 1))
            if isinstance(exc, DnsProviderError) and exc.retry_at:
                # the rate limit's reset, in whole seconds: one more to be past it
                delay = min(max(exc.retry_at + 1.0 - time.time(), 1.0), DNS_RETRY_MAX_S)
            log.warning("dns update failed attempt=%d retry_in=%.0fs error=%s",
                        self.failures, delay, exc)
            return delay

# =====================================================================
# WIRING — the Server object: builds the parts above, binds the fixed
# listeners, owns the loop, signals and periodic sweeps; built by main()
# =====================================================================

SERVER_CERT_DAYS = 90  # renewed at start when less than a week is left
X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's flag; the ssl module has no name for it


REFUSAL_PREFIXES = ("pod handshake", "pod refused", "protocol error", "api connection cap",
                    "http front refused", "%s, consumer closed", "stream cap reached",
                    "tunnel cap reached", "internal error contained",
                    "stream reset, reader stalled")


class RepeatedLines(logging.Filter):
    """On the server's logger: of each kind of refusal line (REFUSAL_PREFIXES,
    told apart by message template), LOG_REPEAT_LIMIT pass per
    LOG_REPEAT_WINDOW_S; the others are counted, and once the window is over
    one line says "N more like this in the last 60 s". flush() ends windows
    (the sweep calls it); filter() runs in any thread."""

    def __init__(self):
        super().__init__()
        self.windows = {}  # message template -> [window start, lines of its kind]
        self.lock = threading.Lock()

    def filter(self, record):
        """logging.Filter: pass a refusal line, or count it once its kind filled the window."""
        if not isinstance(record.msg, str) or not record.msg.startswith(REFUSAL_PREFIXES):
            return True
        now = time.monotonic()
        with self.lock:
            window = ended = self.windows.get(record.msg)
            if window is None or now - window[0] >= LOG_REPEAT_WINDOW_S:
                window = self.windows[record.msg] = [now, 0]
            else:
                ended = None
            window[1] += 1
            passed = window[1] <= LOG_REPEAT_LIMIT
        if ended:
            self.report(record.msg, ended)
        return passed

    def flush(self, now):
        """Close the windows older than LOG_REPEAT_WINDOW_S, reporting what each held back."""
        with self.lock:
            ended = [(m, w) for m, w in self.windows.items() if now - w[0] >= LOG_REPEAT_WINDOW_S]
            for message, _ in ended:
                del self.windows[message]
        for message, window in ended:
            self.report(message, window)

    def report(self, message, window):
        """One line saying how many lines of a kind were held back."""
        if window[1] > LOG_REPEAT_LIMIT:
            event = " ".join(w for w in message.split() if "=" not in w and "%" not in w)
            log.warning("%d more like this in the last %d s: %s", window[1] - LOG_REPEAT_LIMIT,
                        LOG_REPEAT_WINDOW_S, event.rstrip(",:"))


def tls_server_context(cert, key, minimum=ssl.TLSVersion.TLSv1_2):
    """A server's TLS context serving `cert` (with its chain) and `key`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.load_cert_chain(cert, key)
    return context


class Server:
    """Everything a running server owns, started by start() and run by run()."""

    def __init__(self, settings):
        self.settings = settings
        self.loop = EventLoop(log, settings.max_buffered_bytes, settings.buffer_stall)
        self.store = Store(settings)
        self.ca = CertAuthority(os.path.join(settings.state_dir, "ca"),
                                settings.ca_cert or None, settings.ca_key or None)
        self.api = Api(settings, self.store, self.ca)
        self.hub = Hub(self.loop, settings, self.store)
        self.presence = self.api.presence = self.hub.presence = Presence(settings.state_dir)
        self.front_listeners = []
        self.lock_fd = None
        self.stopping = False
        self.last_traffic_save = time.monotonic()
        self.dns = None             # BuiltinDns when DNS_PORT is set
        self.reconciler = None      # DnsReconciler for DYNAMIC_DNS_SERVICE=dnsimple:...
        self.acme = None            # AcmeOrders when ACME_DIRECTORY is set
        self.acme_api_context = None  # the API's TLS context with the ACME certificate
        self.acme_http01 = None     # token -> key authorization bytes or None (HTTP-01)

    # -- start-up -------------------------------------------------------
    def prepare_state(self):
        """State dir, lock, CA, tokens; prints a first token on first start."""
        os.makedirs(self.settings.state_dir, mode=0o700, exist_ok=True)
        self.lock_fd = lock_state_dir(self.settings.state_dir)
        self.ca.ensure(self.settings.tunnel_domain)
        created = ensure_tokens_file(self.settings.tokens_file)
        self.api.tokens = load_tokens(self.settings.tokens_file)
        count = self.store.load()
        self.presence.load(server_running=False)
        self.presence.keep_only({r["id"] for r in self.store.all()})
        self.api.certs.prune()
        log.info("state loaded dir=%s tunnels=%d tokens=%d", self.settings.state_dir,
                 count, len(self.api.tokens))
        return created

    def tls_contexts(self):
        """(API on HTTPS_PORT, pods on TUNNEL_PORT) TLS with the server certificate
        from the CA, renewed as needed; pods need TLS 1.3 and a certificate of the CA."""
        s = self.settings
        ips = sorted({"127.0.0.1", "::1", *s.public_address}
                     | ({s.listen_address} - {"0.0.0.0", "::"}))
        key = os.path.join(self.ca.ca_dir, "server.key")
        cert = os.path.join(self.ca.ca_dir, "server.pem")
        self.ca.issue_server_cert([s.tunnel_domain], ips, key, cert, SERVER_CERT_DAYS)
        api = tls_server_context(cert, key)
        api.sni_callback = self.on_api_sni
        pods = tls_server_context(cert, key, ssl.TLSVersion.TLSv1_3)
        pods.verify_mode = ssl.CERT_REQUIRED
        # Expiry is judged after HELLO (PodGate.judge), so that the pod of an
        # expired tunnel gets a REJECT with the reason instead of a TLS alert.
        pods.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        pods.load_verify_locations(cadata=self.ca.ca_pem())
        return api, pods

    def on_api_sni(self, tls, name, _context):
        """The bare domain by name gets the ACME certificate once there is one;
        connections by address (or before) keep the server-CA certificate."""
        acme_context = self.acme_api_context
        if acme_context is not None and name and name.lower().rstrip(".") == self.settings.tunnel_domain:
            tls.context = acme_context

    def bind_all(self):
        """Bind every fixed listener (port 0: the port bound is written back to
        the settings); Unavailable (exit 3) names a taken port."""
        s = self.settings
        api_context, gate_context = self.tls_contexts()
        self.api_server = ApiServer(self.api, api_context)
        self.fronts = Fronts(self.loop, s, self.hub, self.api_server, self.acme_http01)
        self.hub.on_http_port_accept = self.fronts.on_http_port_accept
        self.gate = PodGate(s, self.store, self.api.certs, gate_context, self.loop, self.hub.attach)
        plan = (("http", self.fronts.on_http_accept), ("https", self.fronts.on_https_accept),
                ("tunnel", self.gate.admit))
        for name, on_accept in plan:
            sock = bind_listener(s.listen_address, getattr(s, name + "_port"))
            setattr(s, name + "_port", sock.getsockname()[1])
            self.front_listeners.append(Listener(self.loop, sock, on_accept, name))

    def start(self):
        """State, listeners and DNS; prints the first token on a first start; logs `ready`."""
        created = self.prepare_state()
        try:
            self.bind_all()
            self.start_dns()
            self.start_acme()
        except BaseException:
            if created:  # the token was never printed: the next start makes and prints one
                with contextlib.suppress(OSError):
                    os.unlink(self.settings.tokens_file)
            raise
        self.store.on_change = self.on_store_change
        warn_if_ports_meet_ephemeral_range(self.settings.tunnel_ports)
        self.hub.sync()
        self.api.metrics = self.metrics_text
        self.api.status_lines = self.status_lines
        self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)
        self.repeats = RepeatedLines()
        log.addFilter(self.repeats)
        if created:
            print_first_token(self.settings, created)
        s = self.settings
        dns = " dns=%s:%d" % (s.listen_address, self.dns.responder.port) if self.dns else ""
        log.info("ready http=%s:%d https=%s:%d tunnel=%s:%d domain=%s%s", s.listen_address,
                 s.http_port, s.listen_address, s.https_port, s.listen_address, s.tunnel_port,
                 s.tunnel_domain, dns)

    def start_dns(self):
        """Reachability checks, the responder on DNS_PORT (if set) and the
        dnsimple reconciliation thread (if chosen)."""
        s = self.settings
        self.api.reachability = functools.partial(check_reachability, s, self.store)
        if s.dns_port is not None:
            self.dns = BuiltinDns(s, self.store)
            self.dns.start(self.loop)
        elif s.dynamic_dns_service == "builtin":
            log.warning("DYNAMIC_DNS_SERVICE=builtin without DNS_PORT: nothing answers DNS")
        if s.dynamic_dns_service and not server_addresses(s):
            log.warning("PUBLIC_ADDRESS is empty: names of relayed tunnels get no address")
        if s.dynamic_dns_service.startswith("dnsimple:"):
            self.reconciler = DnsReconciler(DnsimpleProvider(s),
                                            lambda: dns_wanted(self.store.all(), s, time.time()))
            self.reconciler.start()

    def start_acme(self):
        """With ACME_DIRECTORY: the ACME worker, its challenge answers, the
        jobs of existing tunnels and the server's own name (HTTPS_PORT)."""
        s = self.settings
        if not s.acme_directory:
            return
        client = AcmeClient(s.acme_directory, os.path.join(s.state_dir, "acme", "account.key"),
                            s.acme_email, s.acme_ca_bundle)
        self.acme = AcmeOrders(s, client, self.acme_challenger(), self.acme_wanted, self.on_acme_change)
        self.acme.load()
        self.api.acme = self.acme
        self.hub.cert_view = self.acme.status
        self.request_server_acme_cert()
        self.acme.start()
        log.info("acme on directory=%s challenge=%s", s.acme_directory, self.acme.challenger.kind)

    def acme_challenger(self):
        """DNS-01 through dnsimple or the built-in DNS, or HTTP-01 on the HTTP front."""
        s = self.settings
        dns_managed = self.reconciler is not None or self.dns is not None
        kind = s.acme_challenge or ("dns-01" if dns_managed else "http-01")
        if kind == "http-01":
            challenger = HttpTokenChallenger()
            self.acme_http01 = self.fronts.acme_http01 = challenger.answer
            return challenger
        if self.reconciler is not None:
            return DnsTxtChallenger(self.reconciler.provider.set_txt)
        if self.dns is None:
            raise UsageError("ACME_CHALLENGE=dns-01 needs DNS_PORT or DYNAMIC_DNS_SERVICE=dnsimple:...")
        return DnsTxtChallenger(self.dns.set_txt)

    def acme_wanted(self, key):
        """Whether an ACME job is still wanted: the server's name always, a tunnel while online."""
        if key == ACME_SERVER_KEY:
            return True
        record = self.store.get(key)
        return record is not None and tunnel_status(record) == "online"

    def on_acme_change(self, key):
        """ACME thread: a job changed; the API's certificate or the pod follows."""
        if key == ACME_SERVER_KEY:
            self.use_acme_server_cert()
        else:
            self.loop.call_soon_threadsafe(lambda: self.hub.push_cert(key))

    def request_server_acme_cert(self):
        """Order (or keep) the ACME certificate of the bare domain for the API on HTTPS_PORT."""
        domain = self.settings.tunnel_domain
        key_path = os.path.join(self.settings.state_dir, "acme", "server.key")
        if not os.path.exists(key_path):
            write_atomic(key_path, run_openssl(["genpkey", "-algorithm", "EC",
                                                "-pkeyopt", "ec_paramgen_curve:P-256"]), 0o600)
        csr = run_openssl(["req", "-new", "-key", key_path, "-config", os.devnull, "-subj",
                           "/CN=" + domain, "-addext", "subjectAltName=DNS:" + domain])
        job = self.acme.jobs.get(ACME_SERVER_KEY)
        if job is not None and job["fqdn"] == domain and job.get("chain"):
            csr = job["csr"].encode("ascii")  # the same key: keep the job and its chain
        self.acme.request(ACME_SERVER_KEY, domain, csr.decode("ascii"))
        self.use_acme_server_cert()

    def use_acme_server_cert(self):
        """Serve the API's ACME chain (if valid) to clients that ask for the bare domain."""
        view = self.acme.status(ACME_SERVER_KEY) or {}
        if not view.get("chain"):
            return
        chain_path = os.path.join(self.settings.state_dir, "acme", "server.pem")
        write_atomic(chain_path, view["chain"])
        self.acme_api_context = tls_server_context(
            chain_path, os.path.join(self.settings.state_dir, "acme", "server.key"))
        log.info("api certificate from acme domain=%s not_after=%s", self.settings.tunnel_domain,
                 view.get("not_after"))

    def on_store_change(self, tunnel_id=None):
        """Any thread: listeners, sessions, DNS answers and dnsimple records
        follow the store, for the one tunnel that changed (None: all of them)."""
        self.loop.call_soon_threadsafe(lambda: self.hub.sync(tunnel_id))
        if tunnel_id is not None:
            self.loop.call_soon_threadsafe(lambda: self.hub.refresh_session(tunnel_id))
            if self.store.get(tunnel_id) is None:
                self.presence.forget(tunnel_id)
        else:  # a reload: every tunnel may have changed
            self.presence.keep_only({r["id"] for r in self.store.all()})
        if self.dns is not None:
            self.loop.call_soon_threadsafe(lambda: self.dns.refresh(tunnel_id))
        if self.reconciler is not None:
            self.reconciler.trigger()

    # -- running --------------------------------------------------------
    def sweep(self):
        """Once a second: log summaries, API deadlines, expiry, public ports retried,
        traffic saves, streams idle for STREAM_IDLE_TIMEOUT (when set), connected.json."""
        now, clock, idle = time.time(), time.monotonic(), self.settings.stream_idle_timeout
        self.repeats.flush(clock)
        self.api_server.expire(clock)
        self.store.expire(now)
        self.store.purge_stale(now)
        self.hub.expire(now)
        save = clock - self.last_traffic_save > TRAFFIC_SAVE_INTERVAL_S
        if save:
            self.last_traffic_save = clock
        cutoff = clock - idle if idle else -math.inf
        for session in list(self.hub.sessions.values()) if save or idle else ():
            if save:
                self.hub.save_traffic(session)
            for stream in [s for s in session.streams.values() if s.last_active < cutoff]:
                log.info("stream idle timeout tunnel=%s stream=%d", session.tunnel_id, stream.id)
                stream.abort("idle for %d s" % idle)
        self.presence.save()
        self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)

    def reload(self):
        """SIGHUP: tokens and tunnel files are read again."""
        self.api.tokens = load_tokens(self.settings.tokens_file)
        count = self.store.load()
        self.on_store_change()
        log.info("reloaded tokens=%d tunnels=%d", len(self.api.tokens), count)

    def drain(self):
        """SIGTERM: stop accepting, tell pods, let streams finish, then stop."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: no new connections, streams=%d", self.hub.stream_count())
        for listener in self.front_listeners:
            listener.close()
        if self.dns is not None:
            self.dns.close()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.acme is not None:
            self.acme.stop()
        self.hub.accepting = False
        self.hub.sync()  # closes public listeners
        for session in list(self.hub.sessions.values()):
            session.send_control(Msg.GOAWAY, {"reason": "server shutting down"})
        self.finish_by = time.monotonic() + self.settings.shutdown_grace
        self.wait_for_streams()

    def wait_for_streams(self):
        """During a drain: wait for the streams, until SHUTDOWN_GRACE, then stop the loop."""
        if self.hub.stream_count() and time.monotonic() < self.finish_by:
            self.loop.call_later(0.1, self.wait_for_streams)
            return
        for session in list(self.hub.sessions.values()):
            session.destroy("server stopped")
        self.loop.stop()

    def run(self):
        """Serve until SIGTERM or SIGINT drains; SIGHUP reloads."""
        signal.signal(signal.SIGTERM, lambda *_: self.loop.call_soon_threadsafe(self.drain))
        signal.signal(signal.SIGINT, lambda *_: self.loop.call_soon_threadsafe(self.drain))
        signal.signal(signal.SIGHUP, lambda *_: self.loop.call_soon_threadsafe(self.reload))
        self.loop.run()
        self.presence.save()
        self.repeats.flush(float("inf"))
        log.info("stopped")

    # -- what the API shows ---------------------------------------------
    def on_loop(self, function, timeout_s=5.0):
        """From an API thread: run `function` on the loop thread, which owns
        the sessions, and return its result (Unavailable if the loop is busy)."""
        done = concurrent.futures.Future()

        def run():
            try:
                done.set_result(function())
            except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
                done.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        try:
            return done.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise Unavailable("the relay did not answer within %g s; retry" % timeout_s) from None

    def live_counts(self):
        """On the loop thread: a copy of what /metrics and / show of the sessions."""
        hub, loop = self.hub, self.loop
        return {"pods": len(hub.sessions), "streams": hub.stream_count(),
                "traffic": {t: hub.unsaved_traffic(t) for t in hub.sessions},
                "internal_errors": loop.crashes, "buffered": loop.buffered,
                "held": len(loop.pressed)}

    def metrics_text(self, tenants=False):
        """Prometheus text; per-tunnel lines (which name tenants) only with
        `tenants` and METRICS_PER_TUNNEL (at 10,000 tunnels they are most of
        a scrape's size and cost)."""
        records, live, now = self.store.metric_rows(), self.on_loop(self.live_counts), time.time()
        lines = []
        for name, kind, text, samples in self.metric_families(records, live, now, tenants):
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            lines += ["%s%s %d" % (name, labels, value) for labels, value in samples]
        return "\n".join(lines) + "\n"

    def metric_families(self, records, live, now, tenants):
        """Yield (name, type, help, [(labels, value)]) for each /metrics family."""
        online = sum(tunnel_status(r, now) == "online" for r in records)
        traffic = [(r, live["traffic"].get(r["id"], (0, 0))) for r in records]
        yield ("pipe2me_tunnels", "gauge", "Tunnels known to the server, by status.",
               [('{status="online"}', online), ('{status="expired"}', len(records) - online)])
        yield ("pipe2me_pods_connected", "gauge", "Pods with a live tunnel connection.",
               [("", live["pods"])])
        yield ("pipe2me_streams_open", "gauge", "Consumer streams being relayed.",
               [("", live["streams"])])
        yield ("pipe2me_bytes_total", "counter", "Bytes relayed, all tunnels (in = consumer to pod).",
               [('{direction="in"}', sum(r["bytes_in"] + t[0] for r, t in traffic)),
                ('{direction="out"}', sum(r["bytes_out"] + t[1] for r, t in traffic))])
        yield ("pipe2me_buffered_bytes", "gauge",
               "Bytes held for readers that lag (budget: MAX_BUFFERED_BYTES).", [("", live["buffered"])])
        yield ("pipe2me_sources_held", "gauge", "Pods not read for now because of the budget.",
               [("", live["held"])])
        yield ("pipe2me_internal_errors_total", "counter",
               "Connections closed because a callback raised (bugs; see the debug log).",
               [("", live["internal_errors"])])
        if tenants and self.settings.metrics_per_tunnel:
            yield ("pipe2me_tunnel_bytes_total", "counter",
                   "Bytes relayed per tunnel (in = consumer to pod).",
                   [(sample % r["fqdn"], r[key] + t[index]) for r, t in traffic
                    for sample, key, index in (('{fqdn="%s",direction="in"}', "bytes_in", 0),
                                               ('{fqdn="%s",direction="out"}', "bytes_out", 1))])

    def status_lines(self, _tenants=False):
        """The counts on the status page."""
        live = self.on_loop(self.live_counts)
        return ["tunnels: %d" % self.store.count(), "pods connected: %d" % live["pods"],
                "streams open: %d" % live["streams"]]


def print_first_token(settings, token):
    """The first token and a pod command that works wherever it is pasted."""
    host = "127.0.0.1" if settings.tunnel_domain.endswith("localhost") else settings.tunnel_domain
    print("token: %s" % token)
    print("pod command: %s setup --server http://%s:%d --auth %s"
          " --protocols http,https --local-ports 8100,8101"
          % (pod_command(), host, settings.http_port, token), flush=True)


def pod_command():
    """How to run the pod here: `pipe2me` when installed as a command (as this server
    is, `pipe2me-server`), else python3 and the path of the pod script beside this one."""
    import shutil
    if os.path.basename(sys.argv[0] or "") == "pipe2me-server" and shutil.which("pipe2me"):
        return "pipe2me"
    here = os.path.dirname(os.path.abspath(__file__))
    return "python3 %s" % shlex.quote(os.path.join(here, "pipe2me_pod.py"))

# =====================================================================
# CLI — the server in the foreground, admin commands, main()
# =====================================================================

def notify_server(settings):
    """Ask a running server (if any) to reload: admin changes take effect now."""
    pid = running_server_pid(settings.state_dir)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGHUP)


def cmd_tokens(settings, args):
    """`tokens list|add|remove`."""
    path = settings.tokens_file
    tokens = load_tokens(path)
    if args.action == "list":  # names in full: this is the server's own machine
        for name, options in tokens.items():
            print(format_token_line(name, options))
        return
    if args.action == "add":
        if args.name and args.name.partition(":")[0] in TOKEN_OPTIONS:
            args.options, args.name = [args.name] + args.options, None  # `add max_ports:3`
        name = args.name or new_token_name()
        if not TOKEN_NAME.fullmatch(name):
            raise UsageError("a token name needs 4+ characters without spaces, '=' or '#'")
        if name in tokens:
            raise UsageError("token %s exists already" % mask_secret(name))
        # max_ports as the first token's unless given (of an option given twice, the last counts)
        given = ["max_ports:%d" % ADDED_TOKEN_MAX_PORTS] + args.options
        try:
            options = parse_token_line("%s = %s" % (name, " ".join(given)))[1]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        rewrite_tokens_file(path, lambda lines: lines + [format_token_line(name, options)])
        print(name)
    else:
        if not args.name or args.name not in tokens:
            raise UsageError("no such token")
        rewrite_tokens_file(path, lambda lines: [
            line for line in lines if line.partition("=")[0].strip() != args.name])
    notify_server(settings)


def rewrite_tokens_file(path, change):
    """Write tokens.conf as change(its lines), atomically; a file that cannot
    be read or written is one line (exit 3)."""
    try:
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, "".join(line + "\n" for line in change(old.splitlines())), 0o600)
    except OSError as exc:
        raise Unavailable("cannot write %s: %s; nothing changed" % (
            path, exc.strerror or exc)) from None


TUNNELS_LIST_ROW = "%-16s  %-40s %-7s %-9s %-20s  %s"


def cmd_tunnels(settings, args):
    """`tunnels list|show|remove`."""
    store = Store(settings)
    store.load()
    presence = Presence(settings.state_dir).load(running_server_pid(settings.state_dir) is not None)
    if args.action == "list":
        print(TUNNELS_LIST_ROW % ("ID", "FQDN", "EXPIRED", "CONNECTED", "SINCE", "SERVICES"))
        for r in sorted(store.all(), key=lambda r: r["created_at"]):
            seen = presence.view(r["id"])
            print(TUNNELS_LIST_ROW % (
                r["id"], r["fqdn"], "yes" if tunnel_status(r) == "expired" else "no",
                "yes" if seen["connected"] else "no",
                iso_time(seen["connected_since"] or seen["last_seen"]) or "-",
                ",".join("%s:%d" % pair for pair in zip(r["protocols"], r["ports"]))))
        return
    if not args.id:
        raise UsageError("usage: tunnels %s ID (the IDs are in `tunnels list`)" % args.action)
    record = store.get(args.id) if TUNNEL_ID.fullmatch(args.id) else None
    if record is None:
        raise NotFound("no tunnel %s in %s" % (args.id, settings.tunnel_dir))
    if args.action == "show":
        view = public_view(record, settings, presence=presence)
        if settings.acme_directory:
            acme = read_acme_view(settings.state_dir, record["id"]) or {"state": "none"}
            view["acme"] = dict(acme, chain="present" if acme.get("chain") else None)
        print(json.dumps(view, indent=2))
        return
    store.delete(record["id"])
    notify_server(settings)
    print("removed %s %s" % (record["id"], record["fqdn"]))


def cmd_check_config(settings, _args):
    """Print the configuration; exit 2 if a line of the tokens file is bad
    (the server would skip it)."""
    for key in CONFIG_KEYS:
        value = getattr(settings, key.lower())
        if key == "DYNAMIC_DNS_SERVICE" and value.startswith("dnsimple:"):
            value = "dnsimple:" + mask_secret(value.split(":")[1])
        if key == "METRICS_TOKEN" and value:
            value = mask_secret(value)
        print("%s=%s  # %s" % (key, shown_value(value), settings.origins[key]))
    problems = []
    load_tokens(settings.tokens_file, problems)
    for problem in problems:
        print("pipe2me_server: %s" % problem, file=sys.stderr)
    if problems:
        raise UsageError("%s: %d bad line(s), which the server skips" % (
            settings.tokens_file, len(problems)))


def cmd_dns_refresh(settings, _args):
    """Re-check direct tunnels, then make the provider's records match the
    store; prints one line per change (nothing when all was current)."""
    if not settings.dynamic_dns_service and settings.dns_port is None:
        raise UsageError("DYNAMIC_DNS_SERVICE is empty: there are no DNS records to refresh")
    store = Store(settings)
    store.load()
    now = time.time()
    changes = [line for line in (recheck_direct(settings, store, record, now)
                                 for record in store.all()) if line]
    for line in changes:
        print(line, flush=True)
    if changes:
        notify_server(settings)  # the running server answers (and publishes) the new state
    if settings.dynamic_dns_service.startswith("dnsimple:"):
        made = DnsimpleProvider(settings).reconcile(dns_wanted(store.all(), settings, now))
        for line in made:
            print(line)
        changes += made
    log.info("dns refreshed tunnels=%d changes=%d", len(store.all()), len(changes))


def cmd_service(settings, args):
    """Print a systemd unit or a System V init script that runs this server
    with its configuration as `--user`, with CAP_NET_BIND_SERVICE only."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", args.user):
        raise UsageError("bad --user %r: a system account name, e.g. pipe2me" % args.user)
    argv = server_argv() + service_arguments(settings, args.config)
    values = {"@USER@": args.user, "@DOMAIN@": settings.tunnel_domain,
              "@STATE_DIR@": settings.state_dir, "@DELAY@": str(SERVICE_RESTART_DELAY_S)}
    if args.systemd:
        values["@COMMAND@"] = " ".join(systemd_quote(word) for word in argv)
        values["@PROTECT_HOME@"] = "read-only" if any(
            path.startswith(("/home/", "/root/", "/run/user/"))
            for path in [settings.state_dir] + argv) else "yes"
        template = SERVER_SYSTEMD_TEMPLATE
    else:
        values["@COMMAND@"] = " ".join(shlex.quote(word) for word in argv)
        values["@VERBS@"] = sysv_verbs("pipe2me-server", 30, SERVER_SYSV_MORE_VERBS,
                                       "start|stop|restart|reload|status")
        template = SERVER_SYSV_TEMPLATE
    for key, value in values.items():
        template = template.replace(key, value)
    sys.stdout.write(template)


def server_argv():
    """How a service starts this server: the installed `pipe2me-server` when
    that is how it runs (pip), else this Python and this script's path."""
    import shutil
    if os.path.basename(sys.argv[0] or "") == "pipe2me-server" and shutil.which("pipe2me-server"):
        return [os.path.abspath(shutil.which("pipe2me-server"))]
    return [os.path.abspath(sys.executable or "/usr/bin/python3"), os.path.abspath(__file__)]


def service_arguments(settings, config_path):
    """`--config FILE` (absolute) and the flags this command was given, so the
    service runs with the settings `check-config` shows here."""
    path = os.path.abspath(config_path or os.path.expanduser(DEFAULT_CONFIG_FILE))
    words = ["--config", path] if config_path or os.path.exists(path) else []
    for key, origin in sorted(settings.origins.items()):
        if origin.startswith("flag "):
            value = shown_value(getattr(settings, key.lower()))
            if key.endswith(("_DIR", "_FILE")) and value:
                value = os.path.abspath(value)
            words += [origin.split(" ", 1)[1], value]
    return words


SERVER_SYSTEMD_TEMPLATE = """\
# pipe2me server for @DOMAIN@. Save as /etc/systemd/system/pipe2me-server.service, then:
#   useradd --system --home-dir @STATE_DIR@ --shell /usr/sbin/nologin @USER@
#   install -d -o @USER@ -g @USER@ -m 700 @STATE_DIR@
#   systemctl daemon-reload && systemctl enable --now pipe2me-server
# The configuration file must be readable by @USER@; `systemctl reload` sends
# SIGHUP (tokens and tunnels are read again).
[Unit]
Description=pipe2me server for @DOMAIN@
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=@USER@
Group=@USER@
ExecStart=@COMMAND@
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=@DELAY@
# exit 2 (bad configuration): restarting will not help
RestartPreventExitStatus=2
TimeoutStopSec=30
LimitNOFILE=65536
UMask=0077
# Only the capability to bind ports below 1024 (80, 443, 53), nothing else.
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=@STATE_DIR@
ProtectHome=@PROTECT_HOME@
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
PrivateMounts=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""

SERVER_SYSV_TEMPLATE = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          pipe2me-server
# Required-Start:    $network $remote_fs $syslog
# Required-Stop:     $network $remote_fs $syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: pipe2me server for @DOMAIN@
### END INIT INFO
# Save as /etc/init.d/pipe2me-server, then:
#   useradd --system --home-dir @STATE_DIR@ --shell /usr/sbin/nologin @USER@
#   install -d -o @USER@ -g @USER@ -m 700 @STATE_DIR@
#   chmod +x /etc/init.d/pipe2me-server && update-rc.d pipe2me-server defaults
#   /etc/init.d/pipe2me-server start
# Runs as @USER@ with CAP_NET_BIND_SERVICE only (setpriv, util-linux) and
# restarts it after a failure; exit 0 (stopped) and 2 (bad configuration) end
# the loop since restarting will not help.

PIDFILE=${PIDFILE:-/var/run/pipe2me-server.pid}
LOGFILE=${LOGFILE:-/var/log/pipe2me-server.log}

run() {
	exec setpriv --reuid=@USER@ --regid="$(id -g @USER@)" --init-groups \\
		--inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \\
		--bounding-set=-all,+net_bind_service --no-new-privs \\
		@COMMAND@
}

supervise() {
	child=
	trap 'if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child"; fi; exit 0' TERM
	trap 'if [ -n "$child" ]; then kill -HUP "$child" 2>/dev/null; fi' HUP
	while :; do
		run &
		child=$!
		wait "$child"
		rc=$?
		# a HUP for the child interrupts wait: wait again while it runs
		while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
		child=
		case $rc in 0|2) exit "$rc" ;; esac
		sleep @DELAY@
	done
}

@VERBS@"""

# reload: SIGHUP, tokens and tunnel files are read again
SERVER_SYSV_MORE_VERBS = """\
reload|force-reload)
	if is_running; then kill -HUP "$(cat "$PIDFILE")"; fi
	;;
restart)
	do_stop
	"$0" start
	;;
"""


def cmd_serve(settings, _args):
    """Run the server in the foreground until it is stopped."""
    run_from_compiled_code()
    raise_open_file_limit()
    server = Server(settings)
    server.start()
    server.run()


def build_parser():
    """The command line: one flag per configuration key, and the admin commands."""
    parser = argparse.ArgumentParser(prog="pipe2me_server.py", description="pipe2me tunnel server")
    parser.add_argument("--config", help="configuration file (default ~/pipe2me.server.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for key, (_, _, text) in CONFIG_KEYS.items():
        parser.add_argument("--" + key.lower().replace("_", "-"), dest=key, help=text)
    commands = parser.add_subparsers(dest="command")
    tokens = commands.add_parser("tokens", help="list, add or remove auth tokens")
    tokens.add_argument("action", choices=["list", "add", "remove"])
    tokens.add_argument("name", nargs="?")
    tokens.add_argument("options", nargs="*", help="option:value, e.g. max_ports:3 lifespan:7d")
    tunnels = commands.add_parser("tunnels", help="list, show or remove tunnels")
    tunnels.add_argument("action", choices=["list", "show", "remove"])
    tunnels.add_argument("id", nargs="?")
    commands.add_parser("check-config", help="validate and print the configuration")
    commands.add_parser("dns-refresh", help="reconcile DNS records (cron)")
    service = commands.add_parser("service", help="print a service definition that runs "
                                  "this server at boot with only CAP_NET_BIND_SERVICE")
    kinds = service.add_mutually_exclusive_group(required=True)
    kinds.add_argument("--systemd", action="store_true", help="a systemd unit")
    kinds.add_argument("--sysv", action="store_true", help="a System V init script")
    service.add_argument("--user", default="pipe2me",
                         help="the account the server runs as (default %(default)s)")
    return parser


# each command returns None when it succeeded (exit 0) or raises a Pipe2meError
COMMANDS = {None: cmd_serve, "tokens": cmd_tokens, "tunnels": cmd_tunnels,
            "check-config": cmd_check_config, "dns-refresh": cmd_dns_refresh,
            "service": cmd_service}


class LogFormatter(logging.Formatter):
    """One event, one line: control characters (text from peers) are escaped,
    so no peer can end a log line or forge the next one."""

    def format(self, record):
        """The logging module's line with control characters escaped."""
        return super().format(record).translate(CONTROL_ESCAPES)


def main(argv=None):
    """Run one command; return the exit code."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        settings = load_settings(args.config, {key: getattr(args, key) for key in CONFIG_KEYS})
        COMMANDS[args.command](settings, args)
        return 0
    except Pipe2meError as exc:
        print("pipe2me_server: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
