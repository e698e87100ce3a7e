"""The proxy's HTTP rules, as pure functions (the wire behaviour is checked against nginx in
tests/integration/test_proxy_conformance.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.rules import http

HOST = [(b"Host", b"model")]


def test_upstream_head_is_http_1_1_without_hop_by_hop_fields() -> None:
    req = http.check_request(b"POST", b"/invocations?x=1", "1.0", [
        (b"Host", b"model"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c"), (b"TE", b"trailers"),
        (b"Proxy-Connection", b"keep-alive"), (b"Content-Length", b"3"), (b"X-Kept", b"yes")])
    assert req.head == (b"POST /invocations?x=1 HTTP/1.1\r\nHost: model\r\nContent-Length: 3\r\n"
                        b"X-Kept: yes\r\n\r\n")
    assert (req.length, req.chunked, req.path) == (3, False, b"/invocations")


def test_connection_cannot_name_framing_or_routing_fields() -> None:
    req = http.check_request(b"POST", b"/", "1.1", [
        *HOST, (b"Connection", b"Content-Length, host, X-A"), (b"Content-Length", b"3"),
        (b"X-A", b"1")])
    assert req.head == b"POST / HTTP/1.1\r\nHost: model\r\nContent-Length: 3\r\n\r\n"


def test_chunked_request_head_waits_for_its_length() -> None:
    req = http.check_request(b"POST", b"/invocations", "1.1",
                             [*HOST, (b"Transfer-Encoding", b"chunked"),
                              (b"Expect", b"100-continue")])
    assert req.chunked and req.expect_continue
    head = req.head + http.chunked_head_end(42)
    assert head.endswith(b"Host: model\r\nContent-Length: 42\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Expect" not in head


def test_absolute_form_becomes_origin_form_with_its_host() -> None:
    req = http.check_request(b"POST", b"http://front:8080/invocations?a", "1.1",
                             [(b"Host", b"other")])
    assert req.head == b"POST /invocations?a HTTP/1.1\r\nHost: front:8080\r\n\r\n"
    assert http.origin_form(b"HTTP://x")[0] == b"/"


@pytest.mark.parametrize(("method", "target", "version", "headers", "status"), [
    (b"GET", b"/", "0.9", [], 400),                                   # HTTP/0.9
    (b"GET", b"/", "2.0", HOST, 505),
    (b"GET", b"/", "1.1", [], 400),                                   # no Host
    (b"GET", b"/", "1.1", HOST * 2, 400),                             # two Hosts
    (b"POST", b"/", "1.1", [*HOST, (b"Transfer-Encoding", b"gzip, chunked")], 501),
    (b"POST", b"/", "1.1", [*HOST, (b"Transfer-Encoding", b"chunked")] * 2, 400),  # 2 Hosts first
    (b"POST", b"/", "1.1", [*HOST, (b"Transfer-Encoding", b"chunked"),
                            (b"Transfer-Encoding", b"chunked")], 501),
    (b"POST", b"/", "1.0", [(b"Transfer-Encoding", b"chunked")], 400),
    (b"CONNECT", b"a:443", "1.1", HOST, 405),
    (b"GET", b"a:443", "1.1", HOST, 400),
    (b"GET", b"http://user@x/", "1.1", HOST, 400),
])
def test_refused_like_nginx(method: bytes, target: bytes, version: str,
                            headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(http.Refused) as refused:
        http.check_request(method, target, version, headers)
    assert refused.value.status == status


def test_answer_head_frames_for_the_client() -> None:
    fields = [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive")]
    chunked = [*fields, (b"Transfer-Encoding", b"chunked")]
    # HTTP/1.1: chunked stays chunked, close-delimited becomes chunked, both keep the connection
    for upstream in (chunked, fields):
        answer = http.answer_head(200, b"OK", upstream, is_head=False, client_1_1=True, keep=True)
        assert answer.chunked and answer.keep
        assert answer.head.count(b"Transfer-Encoding: chunked") == 1
        assert b"Connection" not in answer.head
    # HTTP/1.0 keep-alive: only with a length; chunks become a close-delimited body
    answer = http.answer_head(200, b"OK", [*fields, (b"Content-Length", b"2")], is_head=False,
                              client_1_1=False, keep=True)
    assert answer.head.endswith(b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n")
    answer = http.answer_head(200, b"OK", chunked, is_head=False, client_1_1=False, keep=True)
    assert not answer.chunked and not answer.keep and answer.framing == http.CHUNKED_BODY
    assert answer.head.endswith(b"Connection: close\r\n\r\n")
    assert b"Transfer-Encoding" not in answer.head
    # HEAD, 204, 304: no body whatever the fields say
    for status, is_head in ((200, True), (204, False), (304, False)):
        answer = http.answer_head(status, b"", chunked, is_head=is_head, client_1_1=True,
                                  keep=True)
        assert answer.framing == http.NO_BODY and not answer.chunked


def test_answer_head_strips_fields_named_in_connection() -> None:
    answer = http.answer_head(200, b"Fine", [(b"Connection", b"X-Hop"), (b"x-hop", b"1"),
                                             (b"Content-Length", b"0"), (b"Trailer", b"X")],
                              is_head=False, client_1_1=True, keep=True)
    assert answer.head == b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n"


def test_error_answer_to_head_has_no_body() -> None:
    """A body after a HEAD answer would be read as the start of the next answer."""
    head = http.error_answer(504, close=False, is_head=True)
    assert head.endswith(b"Content-Length: 16\r\n\r\n")
    assert http.error_answer(504).endswith(b"\r\n\r\nGateway Timeout\n")


def test_trailers_never_carry_framing_or_routing_fields() -> None:
    section = http.trailer_section([(b"Host", b"evil"), (b"Content-Length", b"9"),
                                    (b"X-Checksum", b"abc")])
    assert section == b"0\r\nX-Checksum: abc\r\n\r\n"


@pytest.mark.parametrize(("path", "counted"), [
    (b"/invocations", True), (b"/invocations/missing", True), (b"/models/m1/invoke", True),
    (b"/models", False), (b"/models/m1", False), (b"/models/a/b/invoke", False),
    (b"/ping", False), (b"/metrics", False)])
def test_counted_paths(path: bytes, counted: bool) -> None:
    assert http.is_invocation(path) is counted


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1,
                 max_size=20).map(str.encode)


@given(st.lists(st.tuples(_token, _token), max_size=12))
def test_no_hop_by_hop_field_ever_reaches_the_upstream(fields: list[tuple[bytes, bytes]]) -> None:
    try:
        req = http.check_request(b"POST", b"/invocations", "1.1", [*HOST, *fields])
    except http.Refused:
        return
    head = req.head + (http.chunked_head_end(0) if req.chunked else b"")
    lines = head.split(b"\r\n")[1:-2]
    named = {t.strip().lower() for n, v in fields if n.lower() == b"connection"
             for t in v.split(b",")}
    names = [line.split(b":", 1)[0].lower() for line in lines]
    assert not set(names) & (http.HOP_BY_HOP | named)
    assert names.count(b"host") == 1


@pytest.mark.parametrize(("method", "path", "expected"), [
    (b"POST", b"/invocations", (http.INVOKE, b"")),
    (b"POST", b"/models/m%201/invoke", (http.INVOKE, b"m%201")),
    (b"POST", b"/models", (http.LOAD, b"")),
    (b"GET", b"/models", (http.OTHER, b"")),          # list models: not counted
    (b"GET", b"/models/m1", (http.OTHER, b"")),       # describe a model
    (b"DELETE", b"/models/m1", (http.UNLOAD, b"m1")),
    (b"DELETE", b"/models/m1/x", (http.OTHER, b"")),
    (b"POST", b"/models//invoke", (http.OTHER, b"")),
    (b"POST", b"/models/invoke", (http.OTHER, b"")),
    (b"POST", b"/modelsX/a/invoke", (http.OTHER, b"")),
    (b"GET", b"/ping", (http.OTHER, b""))])
def test_multi_model_contract_paths(method: bytes, path: bytes,
                                    expected: tuple[int, bytes]) -> None:
    """SageMaker's multi-model container contract: invoke, load and unload are told apart;
    what classify counts as INVOKE is what is_invocation counts."""
    assert http.classify(method, path) == expected
    if method == b"POST":
        assert (expected[0] == http.INVOKE) is http.is_invocation(path)


def test_model_names_become_bounded_printable_dimension_values() -> None:
    assert http.model_name(http.path_segment(b"m%201.tar.gz")) == "m 1.tar.gz"
    assert http.model_name(b"100%25") == "100%25"  # a header is taken as written
    assert http.model_name(http.path_segment(b"a\x00b%0a")) == "a?b?"
    assert http.model_name(b"\xff") == "\ufffd"
    assert http.model_name(b"") == "Unknown"
    assert len(http.model_name(b"x" * 5000)) == http.MAX_MODEL_NAME


@pytest.mark.parametrize(("body", "name"), [
    (b'{"model_name": "resnet", "url": "/opt/ml/models/resnet/model"}', "resnet"),
    (b'{"model_name": "50%"}', "50%"),                # a body's name is not percent-decoded
    (b'{"url": "/opt/ml/models/x"}', None), (b'{"model_name": 7}', None), (b"[1]", None),
    (b"{not json", None), (b"\xff\xfe", None), (b"[" * 100_000, None), (b"", None)])
def test_loaded_model_name_never_raises(body: bytes, name: str | None) -> None:
    assert http.loaded_model_name(body) == name


def test_sagemaker_routing_headers_are_read_and_forwarded() -> None:
    req = http.check_request(b"POST", b"/models/m1/invoke", "1.1", [
        *HOST, (b"X-Amzn-SageMaker-Target-Model", b"model-a.tar.gz"),
        (b"x-amzn-sagemaker-inference-component", b"ic-1"), (b"Content-Type", b"text/csv")])
    assert (req.target_model, req.component) == (b"model-a.tar.gz", b"ic-1")
    assert req.head == (b"POST /models/m1/invoke HTTP/1.1\r\nHost: model\r\n"
                        b"X-Amzn-SageMaker-Target-Model: model-a.tar.gz\r\n"
                        b"x-amzn-sagemaker-inference-component: ic-1\r\n"
                        b"Content-Type: text/csv\r\n\r\n")
    assert http.check_request(b"POST", b"/invocations", "1.1", HOST).target_model is None


@pytest.mark.parametrize(("headers", "is_head", "streamed"), [
    ([(b"Transfer-Encoding", b"chunked")], False, True),
    ([(b"content-type", b"Text/Event-Stream; charset=utf-8")], False, True),  # close-delimited
    ([(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked")], False, True),
    # its size known before its first byte: not a stream, whatever its type
    ([(b"Content-Type", b"text/event-stream"), (b"Content-Length", b"5")], False, False),
    ([(b"Content-Type", b"application/json"), (b"Content-Length", b"5")], False, False),
    ([(b"Content-Type", b"application/json")], False, False),
    ([(b"Transfer-Encoding", b"chunked")], True, False),
    ([(b"Content-Type", b"text/event-stream")], True, False)])
def test_streamed_answers_are_chunked_or_server_sent_events(
        headers: list[tuple[bytes, bytes]], is_head: bool, streamed: bool) -> None:
    answer = http.answer_head(200, b"OK", headers, is_head=is_head, client_1_1=True, keep=True)
    assert http.is_streamed(answer.framing, headers) is streamed


def test_fields_the_proxy_reads_are_still_forwarded_in_answers() -> None:
    fields = [(b"X-Amzn-SageMaker-Target-Model", b"a"), (b"Link", b"</a>")]
    assert http.interim_head(103, b"", fields) == (
        b"HTTP/1.1 103 Early Hints\r\nX-Amzn-SageMaker-Target-Model: a\r\nLink: </a>\r\n\r\n")
    answer = http.answer_head(200, b"OK", [*fields, (b"Content-Length", b"0")], is_head=False,
                              client_1_1=True, keep=True)
    assert b"X-Amzn-SageMaker-Target-Model: a\r\n" in answer.head
