"""ACME pieces in-process: ARI's certificate identifier and window (RFC 9773;
Debian's pebble has no renewal information, so this is where it is
checked), times, Retry-After and problem documents."""

import os
import types

import pytest


def test_acme_ari_cert_id_matches_the_rfc_example(server_mod):
    # RFC 9773 section 4.1: keyIdentifier 69:88:5B:..., serial 00:87:65:43:21
    aki = "69885B6B87464041E1B37B847BA0AE2CDE01C8D4"
    assert server_mod.ari_cert_id("0087654321", aki) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert server_mod.ari_cert_id("87654321", aki) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("text, epoch", [
    ("2025-01-02T04:00:00Z", 1735790400),
    ("2025-01-02T04:00:00.123456Z", 1735790400),
    ("2025-01-02T06:00:00+02:00", 1735790400),
])
def test_acme_rfc3339_times(server_mod, text, epoch):
    assert server_mod.parse_rfc3339(text) == epoch


def test_acme_rfc3339_refuses_junk(server_mod):
    with pytest.raises(ValueError):
        server_mod.parse_rfc3339("tomorrow")


def test_acme_retry_after_seconds_and_dates(server_mod):
    assert server_mod.parse_retry_after("120") == 120
    assert server_mod.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412420) == 60
    assert server_mod.parse_retry_after("soon") is None
    assert server_mod.parse_retry_after("\u00b2") is None   # a latin-1 header byte that isdigit()
    assert server_mod.parse_retry_after("9" * 5000) is None  # past int()'s 4,300 digits
    assert server_mod.parse_retry_after(None) is None


def test_acme_problem_document_becomes_a_one_line_reason(server_mod):
    data = (b'{"type": "urn:ietf:params:acme:error:rateLimited", '
            b'"detail": "too many certificates\\nalready issued"}')
    problem = server_mod.AcmeClient.problem(429, {"Retry-After": "3600"}, data)
    assert problem.kind == "rateLimited" and problem.retry_after_s == 3600
    assert "\n" not in str(problem) and "too many certificates already issued" in str(problem)
    assert isinstance(problem, server_mod.Unavailable)


def test_acme_problem_text_from_the_ca_is_escaped(server_mod):
    """The CA's type and detail reach log lines and the pod: line and page
    separators beyond C0 (NEL, U+2028) and escapes arrive escaped."""
    doc = {"type": "urn:ietf:params:acme:error:bad\u2028kind\x1b[31m",
           "detail": "one\x85two\u2028three"}
    reason = str(server_mod.acme_problem(doc, "order invalid"))
    assert reason.isascii() and "\x1b" not in reason and "\u2028" not in reason, reason
    assert "one\\x85two\\u2028three" in reason, reason


def orders_with(server_mod, window, tmp_path):
    client = types.SimpleNamespace(renewal_window=lambda serial, aki: window)
    settings = types.SimpleNamespace(state_dir=str(tmp_path))
    return server_mod.AcmeOrders(settings, client, None, lambda key: True, lambda key: None)


def test_acme_renews_inside_the_ari_window_when_offered(server_mod, tmp_path):
    orders = orders_with(server_mod, (5000, 6000, None), tmp_path)
    for _ in range(20):
        assert 5000 <= orders.renew_time(0, 9000, "01", "AB") < 6000


def test_acme_renews_at_two_thirds_without_ari(server_mod, tmp_path):
    assert orders_with(server_mod, None, tmp_path).renew_time(0, 9000, "01", "AB") == 6000


def test_acme_a_new_csr_for_the_same_key_keeps_the_job(server_mod, tmp_path):
    from helpers import make_csr, make_key
    one, other = make_key(str(tmp_path / "one.key")), make_key(str(tmp_path / "other.key"))
    name = "calm-teal-otter.pipe2.test"
    first = make_csr(one, "/CN=" + name, "subjectAltName=DNS:" + name)
    again = make_csr(one, "/CN=" + name, "subjectAltName=DNS:" + name)
    assert first != again  # ECDSA signatures differ, the key does not
    orders = orders_with(server_mod, None, tmp_path)
    orders.load()
    orders.request("t1", name, first)
    orders.jobs["t1"].update(state="valid", chain="kept")
    orders.request("t1", name, again)
    assert orders.jobs["t1"]["state"] == "valid" and orders.jobs["t1"]["csr"] == first
    orders.request("t1", name, make_csr(other, "/CN=" + name, "subjectAltName=DNS:" + name))
    assert orders.jobs["t1"]["state"] == "pending"


def test_acme_a_new_key_is_ordered_at_most_once_an_hour(server_mod, tmp_path):
    """A tenant who re-keys in a loop cannot spend the CA account's orders,
    which every tenant shares: after an order, a new key waits its turn."""
    from helpers import make_csr, make_key
    name = "calm-teal-otter.pipe2.test"
    csrs = [make_csr(make_key(str(tmp_path / ("k%d.key" % i))), "/CN=" + name,
                     "subjectAltName=DNS:" + name) for i in range(3)]
    orders = orders_with(server_mod, None, tmp_path)
    orders.load()
    orders.request("t1", name, csrs[0])
    assert orders.jobs["t1"]["state"] == "pending"   # the first order: at once
    ordered = int(server_mod.time.time())
    orders.jobs["t1"].update(state="valid", chain="kept", ordered_at=ordered)
    orders.request("t1", name, csrs[1])
    job = orders.jobs["t1"]
    assert job["state"] == "queued" and "once an hour" in job["reason"], job
    assert job["next_try_at"] == ordered + server_mod.ACME_REKEY_INTERVAL_S
    job.update(ordered_at=ordered - server_mod.ACME_REKEY_INTERVAL_S)
    orders.request("t1", name, csrs[2])              # an hour after the last order: at once
    assert orders.jobs["t1"]["state"] == "pending"


def test_acme_token_share_counts_per_token_and_loads_files_from_before_it(server_mod, tmp_path):
    """The week's count as stored before the shares (times only) still holds
    the weekly limit; each token's share is counted on its own, and kept in
    the file a restarted server reads."""
    settings = types.SimpleNamespace(state_dir=str(tmp_path), acme_new_certs_per_week=4,
                                     acme_new_certs_per_token_per_week=2)
    orders = server_mod.AcmeOrders(settings, None, None, lambda key: True, lambda key: None)
    orders.load()
    now = int(server_mod.time.time())
    old = now - server_mod.ACME_RATE_WINDOW_S - 10     # out of the window: forgotten
    server_mod.write_json(orders.issued_path(), {"version": 1, "issued": [old, now - 60]})
    assert orders.new_certificate_hold("a") is None
    orders.count_new_certificate("a")
    orders.count_new_certificate("a")
    again = server_mod.AcmeOrders(settings, None, None, lambda key: True, lambda key: None)
    frees_at, reason = again.new_certificate_hold("a")
    assert "share of 2 new certificates a week" in reason and "ACME_NEW_CERTS_PER_TOKEN_PER_WEEK" in reason
    assert now + server_mod.ACME_RATE_WINDOW_S <= frees_at <= now + server_mod.ACME_RATE_WINDOW_S + 5
    assert server_mod.iso_time(frees_at)[:13] in reason
    assert again.new_certificate_hold("b") is None and again.new_certificate_hold(None) is None
    again.count_new_certificate(None)                  # the server's own name: no token
    frees_at, reason = again.new_certificate_hold("b")
    assert "limit of 4 new certificates a week" in reason
    assert frees_at == now - 60 + server_mod.ACME_RATE_WINDOW_S
    assert oct(os.stat(orders.issued_path()).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("odd", ["directory", "order"])
def test_acme_an_odd_answer_fails_the_order_not_the_worker(server_mod, tmp_path, odd):
    """A CA (or a proxy in front of it) answering 200 with HTML for the directory,
    or a JSON list for the new order, makes that order fail and be retried; the
    worker thread that runs every job goes on."""
    from helpers import make_csr, make_key
    name = "calm-teal-otter.pipe2.test"
    ca = "https://acme.invalid/"
    client = server_mod.AcmeClient(ca + "dir", str(tmp_path / "account.key"))
    directory = {"newNonce": ca + "nonce", "newAccount": ca + "acct", "newOrder": ca + "order",
                 "renewalInfo": ca + "ari"}

    def request(method, url, body=None):
        client.nonce = "nonce"
        if url == client.directory_url:
            return 200, {}, b"<html>down</html>" if odd == "directory" else \
                server_mod.json.dumps(directory).encode()
        if url == directory["newAccount"]:
            return 201, {"Location": ca + "acct/1"}, b"{}"
        return 201, {"Location": ca + "order/1"}, b"[]"
    client.request = request
    settings = types.SimpleNamespace(state_dir=str(tmp_path), acme_retry=60,
                                     acme_new_certs_per_week=0, acme_new_certs_per_token_per_week=0)
    orders = server_mod.AcmeOrders(settings, client, None, lambda key: True, lambda key: None)
    orders.load()
    orders.request("t1", name, make_csr(make_key(str(tmp_path / "k.key")), "/CN=" + name,
                                        "subjectAltName=DNS:" + name))
    orders.jobs["t1"].update(chain="old", chain_fqdn=name, serial="01", aki="AB" * 20,
                             next_try_at=0)   # a renewal: the only order that asks for ARI first
    orders.process(dict(orders.jobs["t1"]))
    job = orders.jobs["t1"]
    assert job["state"] == "failed" and "answered unexpectedly" in job["reason"], job


def test_acme_ca_that_trickles_its_answer_is_cut_at_the_timeout(server_mod, tmp_path, monkeypatch):
    """A CA (or a path to it) sending its answer's body a byte every 0.2 s: the request
    fails at ACME_HTTP_TIMEOUT_S in all, and the order is retried later (the
    one worker thread that runs every tenant's orders was held for hours)."""
    from helpers import RawHttp, raises_within, self_signed
    cert, key = self_signed(str(tmp_path))
    body = b'{"newNonce": "https://127.0.0.1:1/nonce", "newOrder": "x", "padding": "%s"}' % (
        b"x" * 100)
    raw = RawHttp(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                  gap_s=0.2, tls=(cert, key))
    monkeypatch.setattr(server_mod, "ACME_HTTP_TIMEOUT_S", 1)
    client = server_mod.AcmeClient(raw.url + "/dir", str(tmp_path / "account.key"), ca_bundle=cert)
    try:
        error = raises_within(client.directory, server_mod.Unavailable, 15)
    finally:
        raw.close()
    assert error == "ACME server %s unreachable: timed out after 1 s" % raw.url[8:], error


def test_acme_redirect_is_an_answer_not_followed(server_mod, tmp_path):
    """A 3xx from the CA is handed back as the answer: never followed, so a
    JWS is never re-sent as a GET, nor anything sent to a plain-http URL."""
    from helpers import RawHttp, self_signed
    cert, key = self_signed(str(tmp_path))
    plain = RawHttp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    moved = RawHttp(b"HTTP/1.1 302 Found\r\nLocation: %s/evil\r\nContent-Length: 0\r\n\r\n"
                    % plain.url.encode(), tls=(cert, key))
    client = server_mod.AcmeClient(moved.url + "/dir", str(tmp_path / "account.key"), ca_bundle=cert)
    try:
        for method, body in (("GET", None), ("POST", b"{}")):
            status, headers, _data = client.request(method, moved.url + "/x", body)
            assert status == 302 and headers.get("Location") == plain.url + "/evil", method
    finally:
        moved.close()
        plain.close()
