"""The CERTIFICATES section of pipe2me_server.py against the real openssl CLI."""

import base64
import datetime
import os
import random
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAIN = "pipe2.localhost"
FQDN = "calm-teal-otter.pipe2.localhost"
HOUR_S = 3600
DAY_S = 86400


from conftest import SERVER, load_script
from helpers import KEY_ARGS, cert_fields, make_csr, make_key, openssl

cs = load_script(SERVER, "pipe2me_server")


# ---- helpers -------------------------------------------------------------

def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)
    return str(path)


def iso_epoch(text):
    moment = datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%SZ")
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def verify(tmp_path, leaf_pem, ca_file, *extra):
    leaf = write(tmp_path / "verify-leaf.pem", leaf_pem)
    return subprocess.run(["openssl", "verify", "-CAfile", ca_file] + list(extra) + [leaf],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)


def pem_of(der, label="CERTIFICATE REQUEST"):
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def csr_der(pem):
    return openssl("req", "-outform", "DER", input_bytes=pem.encode())


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One private key file per kind, made once (RSA generation is slow)."""
    folder = tmp_path_factory.mktemp("keys")
    paths = {}
    for kind in KEY_ARGS:
        paths[kind] = make_key(folder / (kind + ".pem"), kind)
    return paths


def csr_for(key_file, subject="/CN=" + FQDN, *addext):
    """A CSR for FQDN unless told otherwise."""
    return make_csr(key_file, subject, *addext)


@pytest.fixture(scope="module")
def public_keys(keys):
    """The public key (PEM) of each key in keys."""
    return {kind: openssl("pkey", "-pubout", "-in", path) for kind, path in keys.items()}


@pytest.fixture
def ca(tmp_path):
    authority = cs.CertAuthority(str(tmp_path / "ca"))
    authority.ensure(DOMAIN)
    return authority


@pytest.fixture
def ca_file(ca, tmp_path):
    return write(tmp_path / "cacert.pem", ca.ca_pem())


# A minimal DER writer, so tests can build CSRs that openssl req refuses to make.

OID_COMMON_NAME = "2.5.4.3"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_NAME_CONSTRAINTS = "2.5.29.30"

def enc(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def enc_oid(dotted):
    arcs = [int(arc) for arc in dotted.split(".")]
    out = b""
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.insert(0, 0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(chunk)
    return enc(0x06, out)


def enc_extension(oid, value_der, critical=False):
    flag = enc(0x01, b"\xff") if critical else b""
    return enc(0x30, enc_oid(oid) + flag + enc(0x04, value_der))


def build_csr(ec_key_file, subject, extension_requests=((),)):
    """A CSR signed by an EC key: subject is [(oid, text)], one attribute per extension list."""
    name = b"".join(enc(0x31, enc(0x30, enc_oid(oid) + enc(0x0C, text.encode())))
                    for oid, text in subject)
    spki = openssl("pkey", "-in", ec_key_file, "-pubout", "-outform", "DER")
    attributes = b"".join(
        enc(0x30, enc_oid(OID_EXTENSION_REQUEST) + enc(0x31, enc(0x30, b"".join(exts))))
        for exts in extension_requests)
    info = enc(0x30, enc(0x02, b"\x00") + enc(0x30, name) + spki + enc(0xA0, attributes))
    signature = openssl("dgst", "-sha256", "-sign", ec_key_file, input_bytes=info)
    algorithm = enc(0x30, enc_oid("1.2.840.10045.4.3.2"))
    return pem_of(enc(0x30, info + algorithm + enc(0x03, b"\x00" + signature)))


def san_dns(*names):
    return enc(0x30, b"".join(enc(0x82, name.encode()) for name in names))


def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ---- the root CA ------------------------------------------------------------

def test_ca_root_created_once_and_self_verifies(ca, ca_file, tmp_path):
    key_mode = stat.S_IMODE(os.stat(ca.key_file).st_mode)
    assert key_mode == 0o600
    assert ca.ca_pem().count("BEGIN CERTIFICATE") == 1
    fields = cert_fields(ca.ca_pem())
    assert fields["subject"] == "CN=pipe2me CA " + DOMAIN
    assert (fields["Basic Constraints"], "Basic Constraints" in fields["critical"]) == ("CA:TRUE", True)
    assert (fields["Key Usage"], "Key Usage" in fields["critical"]) == ("Certificate Sign, CRL Sign", True)
    assert iso_epoch(fields["notAfter"]) > time.time() + 9 * 365 * DAY_S
    assert b": OK" in verify(tmp_path, ca.ca_pem(), ca_file).stdout
    again = cs.CertAuthority(ca.ca_dir)
    again.ensure("other.example")
    assert again.ca_pem() == ca.ca_pem()


def test_ca_root_creation_failure_leaves_no_half_ca(tmp_path, monkeypatch):
    real = cs.run_openssl

    def failing(args, **kwargs):
        if args[0] == "req":
            raise cs.Unavailable("simulated crash while making the root")
        return real(args, **kwargs)

    monkeypatch.setattr(cs, "run_openssl", failing)
    authority = cs.CertAuthority(str(tmp_path / "ca"))
    with pytest.raises(cs.Unavailable):
        authority.ensure(DOMAIN)
    assert [name for name in listing(tmp_path / "ca") if name != "issued"] == []
    monkeypatch.setattr(cs, "run_openssl", real)
    authority.ensure(DOMAIN)
    assert sorted(listing(tmp_path / "ca")) == ["ca.key", "ca.pem", "issued"]


def test_ca_crash_between_key_and_cert_writes_recovers(tmp_path, monkeypatch):
    real = cs.write_atomic
    written = []

    def crash_on_second_write(path, data, mode=0o644):
        if written:
            raise KeyboardInterrupt("simulated crash")
        written.append(path)
        real(path, data, mode)

    monkeypatch.setattr(cs, "write_atomic", crash_on_second_write)
    authority = cs.CertAuthority(str(tmp_path / "ca"))
    with pytest.raises(KeyboardInterrupt):
        authority.ensure(DOMAIN)
    assert len(written) == 1
    monkeypatch.setattr(cs, "write_atomic", real)
    authority.ensure(DOMAIN)
    assert "BEGIN CERTIFICATE" in authority.ca_pem()


def test_ca_lone_key_from_a_crash_is_replaced(tmp_path):
    os.makedirs(tmp_path / "ca")
    write(tmp_path / "ca" / "ca.key", "half written\n")
    authority = cs.CertAuthority(str(tmp_path / "ca"))
    authority.ensure(DOMAIN)
    assert "BEGIN CERTIFICATE" in authority.ca_pem()


def test_ca_cert_without_key_is_refused_not_replaced(ca):
    before = ca.ca_pem()
    os.unlink(ca.key_file)
    with pytest.raises(cs.UsageError, match="missing"):
        cs.CertAuthority(ca.ca_dir).ensure(DOMAIN)
    with open(ca.cert_file) as handle:
        assert handle.read() == before


def test_ca_refuses_invalid_domain_for_root(tmp_path):
    with pytest.raises(cs.UsageError):
        cs.CertAuthority(str(tmp_path / "ca")).ensure("evil/CN=x")
    assert "ca.pem" not in listing(tmp_path / "ca")


# ---- signing -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ec256", "ec384", "rsa2048", "ed25519"])
def test_ca_sign_good_csr_gives_exact_leaf(kind, keys, ca, ca_file, tmp_path):
    csr = csr_for(keys[kind], "/CN=" + FQDN, "subjectAltName=DNS:" + FQDN)
    not_after = int(time.time()) + 2 * HOUR_S
    leaf = ca.sign(csr, FQDN, not_after).pem
    fields = cert_fields(leaf)
    assert fields["subject"] == "CN=" + FQDN
    assert fields["Subject Alternative Name"] == "DNS:" + FQDN
    assert (fields["Basic Constraints"], "Basic Constraints" in fields["critical"]) == ("CA:FALSE", True)
    usage = "Digital Signature, Key Encipherment" if kind == "rsa2048" else "Digital Signature"
    assert (fields["Key Usage"], "Key Usage" in fields["critical"]) == (usage, True)
    assert fields["Extended Key Usage"] == \
        "TLS Web Server Authentication, TLS Web Client Authentication"
    assert iso_epoch(fields["notAfter"]) == not_after
    assert iso_epoch(fields["notBefore"]) <= time.time()
    for purpose in ("sslserver", "sslclient"):
        result = verify(tmp_path, leaf, ca_file, "-purpose", purpose)
        assert result.returncode == 0 and b": OK" in result.stdout, result.stdout


def test_ca_sign_ignores_case_and_missing_san(keys, ca, tmp_path):
    leaf = ca.sign(csr_for(keys["ec256"], "/CN=" + FQDN.upper()), FQDN, time.time() + HOUR_S).pem
    fields = cert_fields(leaf)
    assert fields["subject"] == "CN=" + FQDN
    assert fields["Subject Alternative Name"] == "DNS:" + FQDN


def test_ca_sign_copies_no_extension_from_csr(keys, ca, tmp_path):
    csr = csr_for(keys["ec256"], "/CN=" + FQDN, "keyUsage=critical,keyCertSign,cRLSign",
                  "extendedKeyUsage=codeSigning", "nameConstraints=permitted;DNS:evil.example",
                  "basicConstraints=CA:FALSE")
    leaf = ca.sign(csr, FQDN, time.time() + HOUR_S).pem
    fields = cert_fields(leaf)
    assert fields["Key Usage"] == "Digital Signature"
    assert "Code Signing" not in fields["Extended Key Usage"]
    leaf_file = write(tmp_path / "leaf.pem", leaf)
    out = openssl("x509", "-in", leaf_file, "-noout", "-ext", "nameConstraints")
    assert out.strip() == b""


def test_ca_sign_never_outlives_the_request(keys, ca, tmp_path):
    wanted = time.time() + 90 * 60 + 0.9
    leaf = ca.sign(csr_for(keys["ec256"], "/CN=" + FQDN), FQDN, wanted).pem
    assert iso_epoch(cert_fields(leaf)["notAfter"]) <= wanted
    with pytest.raises(cs.CertRefused, match="expires"):
        ca.sign(csr_for(keys["ec256"], "/CN=" + FQDN), FQDN, time.time() - 1)


def test_ca_sign_refuses_invalid_fqdn_argument(keys, ca):
    for bad in ("a.example/CN=x", "a.example,DNS:b", "a=b", "a.example\nDNS:x", ""):
        with pytest.raises(cs.CertRefused):
            ca.sign(csr_for(keys["ec256"], "/CN=" + FQDN), bad, time.time() + HOUR_S)
    assert listing(ca.issued_dir) == []


def assert_exact_leaf(leaf, tmp_path, fqdn=FQDN, not_after=None, public_key=None):
    """The leaf is exactly what the server issues for fqdn, whatever its CSR asked
    (and carries public_key, PEM, when given)."""
    fields = cert_fields(leaf.pem)
    assert fields["subject"] == "CN=" + fqdn
    assert fields["Subject Alternative Name"] == "DNS:" + fqdn
    assert (fields["Basic Constraints"], "Basic Constraints" in fields["critical"]) == ("CA:FALSE", True)
    assert fields["Key Usage"] in ("Digital Signature", "Digital Signature, Key Encipherment")
    assert fields["Extended Key Usage"] == \
        "TLS Web Server Authentication, TLS Web Client Authentication"
    assert "Name Constraints" not in fields
    key_and_extensions = openssl("x509", "-noout", "-pubkey", "-ext", "certificatePolicies,"
                                 "inhibitAnyPolicy,policyConstraints,issuerAltName",
                                 input_bytes=leaf.pem.encode())
    key = key_and_extensions[:key_and_extensions.index(b"-----END PUBLIC KEY-----\n") + 25]
    assert key_and_extensions == key                  # none of those extensions
    if public_key is not None:
        assert key == public_key
    assert iso_epoch(fields["notAfter"]) == leaf.not_after
    if not_after is not None:
        assert leaf.not_after <= not_after
    assert fields["serial"] == leaf.serial
    return fields


HOSTILE = [  # (key kind, subject, -addext values): each CSR is signed, the leaf stays exact
    ("ec256", "/CN=other.example", []),
    ("ec256", "/CN=" + FQDN + "/CN=evil.example", []),
    ("ec256", "/O=pipe2me/CN=" + FQDN, []),
    ("ec256", "/CN=" + FQDN + ",DNS:evil.example", []),
    ("ec256", "/CN=" + FQDN + "\\/CN=evil.example", []),
    ("ec256", "/CN=evil." + FQDN, []),
    ("ec256", "/CN=*." + DOMAIN, []),
    ("ec256", "/", ["subjectAltName=DNS:" + FQDN]),
    ("ec256", "/CN=pipe2me CA " + DOMAIN, []),
    ("ec256", None, ["subjectAltName=DNS:" + FQDN + ",DNS:evil.example"]),
    ("ec256", None, ["subjectAltName=DNS:evil.example"]),
    ("ec256", None, ["subjectAltName=DNS:" + FQDN + ",IP:127.0.0.1"]),
    ("ec256", None, ["subjectAltName=DNS:" + FQDN + ",email:a@example.com"]),
    ("ec256", None, ["subjectAltName=URI:https://" + FQDN]),
    ("ec256", None, ["subjectAltName=DNS:*.pipe2.localhost"]),
    ("ec256", None, ["basicConstraints=critical,CA:TRUE"]),
    ("ec256", None, ["basicConstraints=CA:TRUE,pathlen:0"]),
    ("ec256", None, ["keyUsage=critical,keyCertSign,cRLSign", "basicConstraints=critical,CA:TRUE"]),
    ("ec256", None, ["nameConstraints=critical,permitted;DNS:evil.example"]),
    ("ec256", None, ["extendedKeyUsage=codeSigning,OCSPSigning,timeStamping"]),
    ("ec256", None, ["certificatePolicies=2.5.29.32.0", "issuerAltName=DNS:evil.example"]),
    ("ec384", "/CN=evil.example", ["subjectAltName=DNS:evil.example",
                                   "basicConstraints=critical,CA:TRUE,pathlen:5"]),
    ("rsa2048", "/CN=evil.example/O=Evil", ["subjectAltName=DNS:evil.example,IP:::1",
                                            "keyUsage=keyCertSign,digitalSignature"]),
    ("ed25519", "/CN=evil.example", ["basicConstraints=critical,CA:TRUE",
                                     "subjectAltName=DNS:" + FQDN + ",otherName:1.2.3.4;UTF8:x"]),
]


@pytest.mark.parametrize("kind, subj, addext", HOSTILE)
def test_ca_every_issued_cert_is_exact_whatever_the_csr_asks(kind, subj, addext, keys,
                                                            public_keys, ca, tmp_path):
    csr = csr_for(keys[kind], subj or "/CN=" + FQDN, *addext)
    not_after = int(time.time()) + HOUR_S
    leaf = ca.sign(csr, FQDN, not_after)
    assert_exact_leaf(leaf, tmp_path, not_after=not_after, public_key=public_keys[kind])
    assert listing(ca.issued_dir) == [leaf.serial + ".pem"]


WEAK_KEYS = [("rsa1024", "1024-bit RSA"), ("ec521", "P-256"), ("ed448", "P-256"),
             ("secp256k1", "P-256"), ("p192", "P-256"), ("rsapss", "RSA of")]


@pytest.mark.parametrize("kind, reason", WEAK_KEYS)
def test_csr_with_weak_or_unsupported_key_refused(kind, reason, keys, ca):
    csr = csr_for(keys[kind], "/CN=" + FQDN, "subjectAltName=DNS:" + FQDN)
    with pytest.raises(cs.CertRefused) as caught:
        ca.sign(csr, FQDN, time.time() + HOUR_S)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.http_status == 400 and caught.value.exit_code == 4
    assert listing(ca.issued_dir) == []


def test_csr_built_in_der_with_injections_gives_exact_leaf(keys, ca, tmp_path):
    """Names that would smuggle text into an openssl string, and requests that openssl req
    refuses to make (an extension twice, two extension requests), built straight in DER."""
    cn = [(OID_COMMON_NAME, FQDN)]
    san = enc_extension(OID_SUBJECT_ALT_NAME, san_dns(FQDN))
    other = enc_extension(OID_SUBJECT_ALT_NAME, san_dns("evil.example"))
    ca_true = enc_extension(OID_BASIC_CONSTRAINTS, enc(0x30, enc(0x01, b"\x01")), critical=True)
    evil = [
        build_csr(keys["ec256"], cn, [[san]]),
        build_csr(keys["ec256"], cn, [[enc_extension(OID_SUBJECT_ALT_NAME,
                                                     san_dns(FQDN + ",DNS:evil.example"))]]),
        build_csr(keys["ec256"], cn, [[enc_extension(OID_SUBJECT_ALT_NAME,
                                                     san_dns(FQDN + "\nDNS:evil.example"))]]),
        build_csr(keys["ec256"], [(OID_COMMON_NAME, FQDN + "\n/CN=evil")]),
        build_csr(keys["ec256"], [(OID_COMMON_NAME, FQDN + "\x00.evil.example")]),
        build_csr(keys["ec256"], cn, [[san, other]]),
        build_csr(keys["ec256"], cn, [[san], [other, ca_true]]),
        build_csr(keys["ec256"], cn, [[ca_true, enc_extension(OID_NAME_CONSTRAINTS, enc(
            0x30, enc(0xA0, enc(0x30, enc(0x82, b"evil.example")))), critical=True)]]),
    ]
    serials = []
    for csr in evil:
        leaf = ca.sign(csr, FQDN, time.time() + HOUR_S)
        assert_exact_leaf(leaf, tmp_path)
        serials.append(leaf.serial + ".pem")
    assert listing(ca.issued_dir) == sorted(serials)


def _bad_signature(csr):
    der = bytearray(csr_der(csr))
    der[-1] ^= 0x01
    return pem_of(bytes(der))


def _inputs_that_are_not_csrs(keys, ca):
    csr = csr_for(keys["ec256"], "/CN=" + FQDN)
    der = csr_der(csr)
    return {
        "plain text": "hello",
        "empty": "",
        "bytes": csr.encode(),
        "random bytes as PEM": pem_of(random.Random(7).randbytes(300)),
        "truncated DER": pem_of(der[:-20]),
        "1 MB": "A" * (1 << 20),
        "1 MB of PEM": pem_of(b"\x30" * (1 << 20)),
        "two CSRs": csr + csr,
        "certificate": ca.ca_pem(),
        "private key": open(keys["ec256"]).read(),
        "non-ASCII": csr.replace("REQUEST-----\n", "REQUEST-----\n\u00e9", 1),
        "bad base64": csr.replace("-----\n", "-----\n!!!!", 1),
        "bad signature": _bad_signature(csr),
        "PEM headers": csr.replace("-----\n", "-----\nProc-Type: 4,ENCRYPTED\n\n", 1),
        "CSR then a key": csr + open(keys["ec256"]).read(),
    }


def test_csr_refused_for_inputs_that_are_not_csrs(keys, ca):
    for label, text in _inputs_that_are_not_csrs(keys, ca).items():
        with pytest.raises(cs.CertRefused) as caught:
            ca.sign(text, FQDN, time.time() + HOUR_S)
        assert "\n" not in str(caught.value), label
    assert listing(ca.issued_dir) == []


def test_csr_bad_signature_named_as_such(keys, ca):
    for kind in ("ec256", "rsa2048", "ed25519"):
        with pytest.raises(cs.CertRefused, match="signature"):
            ca.sign(_bad_signature(csr_for(keys[kind], "/CN=" + FQDN)), FQDN, time.time() + HOUR_S)
    assert listing(ca.issued_dir) == []


# ---- operator-supplied intermediate ------------------------------------------------

def _make_intermediate(folder, days):
    """root.pem/root.key and an intermediate (inter.key, chain.pem = intermediate + root)."""
    openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", "root.key", "-out", "root.pem", "-config", os.devnull,
            "-subj", "/CN=Operator Root", "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "inter.key", "-out", "inter.csr", "-config", os.devnull,
            "-subj", "/CN=Operator Intermediate", cwd=folder)
    write(os.path.join(folder, "ext.cnf"), "[v3_inter]\nbasicConstraints = critical,CA:TRUE,pathlen:0\n"
          "keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n"
          "authorityKeyIdentifier = keyid\n")
    openssl("x509", "-req", "-in", "inter.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-set_serial", "2", "-days", str(days), "-extfile", "ext.cnf", "-extensions", "v3_inter",
            "-out", "inter.pem", cwd=folder)
    with open(os.path.join(folder, "inter.pem")) as a, open(os.path.join(folder, "root.pem")) as b:
        write(os.path.join(folder, "chain.pem"), a.read() + b.read())


def test_ca_intermediate_signs_leaves_that_verify(keys, tmp_path):
    ops = tmp_path / "operator"
    os.makedirs(ops)
    _make_intermediate(str(ops), days=30)
    authority = cs.CertAuthority(str(tmp_path / "ca"), str(ops / "chain.pem"), str(ops / "inter.key"))
    authority.ensure(DOMAIN)
    assert listing(tmp_path / "ca") == ["issued"]
    assert authority.ca_pem().count("BEGIN CERTIFICATE") == 2
    served = write(tmp_path / "served.pem", authority.ca_pem())
    leaf = authority.sign(csr_for(keys["ec256"], "/CN=" + FQDN), FQDN, time.time() + 365 * DAY_S).pem
    assert b": OK" in verify(tmp_path, leaf, served).stdout
    strict = verify(tmp_path, leaf, str(ops / "root.pem"), "-untrusted", served)
    assert strict.returncode == 0, strict.stdout
    inter_end = iso_epoch(cert_fields(open(ops / "inter.pem").read())["notAfter"])
    assert iso_epoch(cert_fields(leaf)["notAfter"]) <= inter_end < time.time() + 31 * DAY_S


def test_ca_supplied_files_checked(tmp_path):
    ops = tmp_path / "operator"
    os.makedirs(ops)
    _make_intermediate(str(ops), days=30)
    with pytest.raises(cs.UsageError, match="both"):
        cs.CertAuthority(str(tmp_path / "ca"), str(ops / "chain.pem"))
    wrong = cs.CertAuthority(str(tmp_path / "ca"), str(ops / "chain.pem"), str(ops / "root.key"))
    with pytest.raises(cs.UsageError, match="does not belong"):
        wrong.ensure(DOMAIN)
    missing = cs.CertAuthority(str(tmp_path / "ca"), str(ops / "nope.pem"), str(ops / "inter.key"))
    with pytest.raises(cs.UsageError, match="cannot read"):
        missing.ensure(DOMAIN)
    assert "ca.pem" not in listing(tmp_path / "ca")


# ---- audit trail --------------------------------------------------------------

def test_ca_issued_dir_holds_every_pod_leaf_and_not_the_server_cert(keys, ca, tmp_path):
    expected = {}
    for index, kind in enumerate(["ec256", "rsa2048", "ed25519"]):
        fqdn = "pod-%d.%s" % (index, DOMAIN)
        leaf = ca.sign(csr_for(keys[kind], "/CN=" + fqdn), fqdn, time.time() + HOUR_S)
        expected[leaf.serial] = ("CN=" + fqdn, "DNS:" + fqdn, leaf.pem)
    ca.issue_server_cert([DOMAIN], ["127.0.0.1"], str(tmp_path / "s.key"), str(tmp_path / "s.pem"), 30)
    names = listing(ca.issued_dir)
    assert sorted(names) == sorted(serial + ".pem" for serial in expected)
    for name in names:
        with open(os.path.join(ca.issued_dir, name)) as handle:
            text = handle.read()
        fields = cert_fields(text)
        subject, san, leaf = expected[name[:-4]]
        assert (fields["subject"], fields["Subject Alternative Name"], text) == (subject, san, leaf)
        assert fields["Basic Constraints"] == "CA:FALSE"
    ca.forget([name[:-4] for name in names[:2]] + [None, "../ca"])
    assert listing(ca.issued_dir) == names[2:]


# ---- the server's own certificate --------------------------------------------------

def _handshake(cert, key, ca_pem, hostname):
    """Complete a TLS handshake over a socketpair; return the error text or None."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cadata=ca_pem)
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(left, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=hostname):
            result = None
    except (ssl.SSLError, OSError) as exc:
        result = str(exc)
    finally:
        right.close()
        thread.join(10)
        left.close()
    assert not thread.is_alive()
    return result


def test_ca_server_cert_serves_tls_for_names_and_addresses(ca, tmp_path):
    key, cert = str(tmp_path / "server.key"), str(tmp_path / "server.pem")
    assert ca.issue_server_cert([DOMAIN, "api.example.net"], ["127.0.0.1", "::1"], key, cert, 90)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for hostname in (DOMAIN, "api.example.net", "127.0.0.1", "::1"):
        assert _handshake(cert, key, ca.ca_pem(), hostname) is None, hostname
    assert "match" in (_handshake(cert, key, ca.ca_pem(), "other.example") or "")
    fields = cert_fields(open(cert).read())
    assert fields["Basic Constraints"] == "CA:FALSE"
    assert fields["Extended Key Usage"] == "TLS Web Server Authentication"


def test_ca_server_cert_reused_until_sans_change_or_expiry_near(ca, tmp_path):
    key, cert = str(tmp_path / "server.key"), str(tmp_path / "server.pem")
    assert ca.issue_server_cert([DOMAIN], ["127.0.0.1"], key, cert, 90) is True
    first = open(cert).read()
    assert ca.issue_server_cert([DOMAIN.upper()], ["127.0.0.1"], key, cert, 90) is False
    assert open(cert).read() == first
    assert ca.issue_server_cert([DOMAIN], ["127.0.0.1", "::1"], key, cert, 90) is True
    second = open(cert).read()
    assert second != first
    assert ca.issue_server_cert([DOMAIN], ["127.0.0.1", "::1"], key, cert, 3) is False
    assert ca.issue_server_cert([DOMAIN], ["::1", "127.0.0.1"], key, cert, 3) is True
    assert ca.issue_server_cert([DOMAIN], ["::1", "127.0.0.1"], key, cert, 3) is True   # < 7 days left
    other = cs.CertAuthority(str(tmp_path / "other-ca"))
    other.ensure(DOMAIN)
    assert other.issue_server_cert([DOMAIN], ["::1", "127.0.0.1"], key, cert, 90) is True
    os.unlink(cert + ".json")     # a crash before the record was written
    assert other.issue_server_cert([DOMAIN], ["::1", "127.0.0.1"], key, cert, 90) is True


def test_ca_server_cert_refuses_bad_names_and_writes_nothing(ca, tmp_path):
    key, cert = str(tmp_path / "server.key"), str(tmp_path / "server.pem")
    for names, ips in ((["evil,DNS:x.example"], []), (["a/CN=b"], []), (["a\nb"], []),
                       ([DOMAIN], ["1.2.3.4,DNS:evil"]), ([DOMAIN], ["::1\n"]), ([], [])):
        with pytest.raises(cs.UsageError):
            ca.issue_server_cert(names, ips, key, cert, 90)
    assert listing(tmp_path) == ["ca"]
    assert listing(ca.issued_dir) == []


# ---- names --------------------------------------------------------------------

@pytest.mark.parametrize("name", [FQDN, "localhost", "a", "x-1.example", "A.B.C",
                                  ("a" * 63 + ".") * 3 + "a" * 61])
def test_fqdn_valid_names(name):
    assert cs.is_hostname(name)


@pytest.mark.parametrize("name", ["", "a/b", "a,b", "a=b", "a b", "a\nb", "a.example\n", "-a",
                                  "a-", "a..b", ".a", "a.", "*.a", "a_b", "\u00e9.example",
                                  "a" * 64, ("a" * 63 + ".") * 3 + "a" * 62, "a\\b", 'a"b', None, 5])
def test_fqdn_invalid_names(name):
    assert not cs.is_hostname(name)


# ---- run_openssl ------------------------------------------------------------------

def test_openssl_missing_binary_names_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(cs.UsageError, match=r"package 'openssl' \(Debian/Ubuntu\)"):
        cs.run_openssl(["version"])


def test_openssl_failure_carries_last_stderr_line(tmp_path):
    with pytest.raises(cs.OpensslFailed) as caught:
        cs.run_openssl(["x509", "-in", str(tmp_path / "absent.pem"), "-noout"])
    message = str(caught.value)
    assert message.startswith("openssl x509 failed (exit 1): ")
    assert "\n" not in message and len(message) > len("openssl x509 failed (exit 1): ")
    assert caught.value.exit_code == 3


def test_openssl_timeout_is_unavailable(tmp_path, monkeypatch):
    fake = tmp_path / "openssl"
    write(fake, "#!/bin/sh\nexec %s 30\n" % shutil.which("sleep"))
    os.chmod(fake, 0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cs, "OPENSSL_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(cs.Unavailable, match="did not finish"):
        cs.run_openssl(["version"])
    assert time.monotonic() - started < 10


def test_openssl_returns_stdout_and_feeds_stdin():
    assert cs.run_openssl(["version"]).startswith(b"OpenSSL")
    assert cs.run_openssl(["base64", "-d"], input_bytes=b"aGVsbG8=\n") == b"hello"


# ---- certificate dates ----------------------------------------------------------------

def test_cert_facts_match_openssl(ca, tmp_path):
    fields = cert_fields(ca.ca_pem())
    start, end, _serial, _aki, is_ca = cs.cert_facts(ca.ca_pem())
    assert (start, end, is_ca) == (iso_epoch(fields["notBefore"]), iso_epoch(fields["notAfter"]), True)
    leaf = ca.sign(csr_for(make_key(tmp_path / "k.pem")), FQDN, time.time() + HOUR_S)
    ski = cs.run_openssl(["x509", "-noout", "-ext", "subjectKeyIdentifier"],
                         input_bytes=ca.ca_pem().encode()).decode().split("\n")[1].strip()
    fields = cert_fields(leaf.pem)
    assert cs.cert_facts(leaf.pem + ca.ca_pem()) == (
        iso_epoch(fields["notBefore"]), iso_epoch(fields["notAfter"]), leaf.serial,
        ski.replace(":", ""), False)
    assert fields["serial"] == leaf.serial and leaf.not_after == iso_epoch(fields["notAfter"])
    with pytest.raises(cs.UsageError):
        cs.cert_facts("not a certificate\n")


def test_ca_supplied_leaf_instead_of_a_ca_refused(ca, tmp_path):
    leaf = ca.sign(csr_for(make_key(tmp_path / "k.pem")), FQDN, time.time() + HOUR_S)
    write(tmp_path / "leaf.pem", leaf.pem)
    wrong = cs.CertAuthority(str(tmp_path / "ca2"), str(tmp_path / "leaf.pem"), ca.key_file)
    with pytest.raises(cs.UsageError, match="unusable"):
        wrong.ensure(DOMAIN)


def _mutations(rng, der):
    """Random, truncated and mutated variants of a DER CSR."""
    yield rng.randbytes(rng.randrange(0, 400))
    yield der[:rng.randrange(0, len(der))]
    flipped = bytearray(der)
    for _ in range(rng.randrange(1, 4)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    yield bytes(flipped)
    spot = rng.randrange(len(der))
    yield der[:spot] + rng.randbytes(rng.randrange(1, 5)) + der[spot:]
    yield der[:spot] + der[spot + rng.randrange(1, 5):]
    lengths = bytearray(der)
    lengths[rng.choice([1, 3, 4, 6, 8])] = rng.choice([0x00, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xFF])
    yield bytes(lengths)


def test_csr_fuzzed_der_refused_or_signed_exact(keys, ca, tmp_path):
    rng = random.Random(20240601)
    bases = [csr_der(csr_for(keys["ec256"], "/CN=" + FQDN, "subjectAltName=DNS:evil.example")),
             csr_der(csr_for(keys["rsa2048"], "/CN=" + FQDN, "basicConstraints=critical,CA:TRUE"))]
    outcomes = {"refused": 0, "signed": 0}
    for _ in range(6):
        for base in bases:
            for data in _mutations(rng, base):
                try:
                    leaf = ca.sign(pem_of(data), FQDN, time.time() + HOUR_S)
                except cs.CertRefused as exc:
                    assert "\n" not in str(exc)
                    outcomes["refused"] += 1
                else:
                    assert_exact_leaf(leaf, tmp_path)
                    outcomes["signed"] += 1
    assert outcomes["refused"] > 50
    assert len(listing(ca.issued_dir)) == outcomes["signed"]
