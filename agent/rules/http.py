"""HTTP/1.1 proxy rules, as pure functions: what to forward, what to refuse, how to frame.

The parsing itself is httptools' (llhttp). These are the decisions a reverse proxy
makes around it, written after nginx's `proxy_http_version 1.1` behaviour and RFC 9110
/ 9112, so the I/O shell in `agent.sources.proxy` only moves bytes:

- A request head is checked (`check_request`) before anything reaches the model:
  HTTP/0.9 and a missing or duplicate Host on HTTP/1.1 are 400, HTTP/2+ request
  lines 505, any transfer coding but a lone `chunked` 501, as nginx answers them.
- The upstream always gets HTTP/1.1 with keep-alive (`upstream_head`); hop-by-hop
  fields and every field named in `Connection:` are stripped both ways (nginx strips
  a fixed set only; RFC 9110 §7.6.1 asks for the named ones too).
- Absolute-form targets become origin-form, with Host taken from the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from agent.model import INVOKE, LOAD, UNLOAD

# RFC 9110 §7.6.1 and the de-facto ones; `expect` is answered by the proxy itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"expect", b"http2-settings"})
# Fields a trailer section may never carry into anything (RFC 9110 §6.5.1).
_NOT_IN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host", b"content-type", b"authorization",
                                 b"set-cookie", b"content-encoding", b"content-range"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class RequestHead:
    """What the proxy needs to know of a request once its head is parsed.

    Attributes:
        head: the head to send upstream (ends with CRLF CRLF), without Content-Length
            when the body is chunked (the proxy adds it once the body is whole).
        chunked: the client sends the body chunked (the proxy de-chunks it).
        length: Content-Length, or -1.
        expect_continue: an HTTP/1.1 client waits for `100 Continue` before its body.
        path: the origin-form path without the query, for counting.
        target_model: `X-Amzn-SageMaker-Target-Model` (a multi-model endpoint's
            TargetModel as the caller named it), or None.
        component: `X-Amzn-SageMaker-Inference-Component`, or None.
    """

    head: bytes
    chunked: bool
    length: int
    expect_continue: bool
    path: bytes
    target_model: bytes | None = None
    component: bytes | None = None


class Refused(Exception):
    """A request the proxy answers itself, never forwarded; `reason` names the counter."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Field names by kind, cached by their spelling on the wire: one dict look-up per field
# instead of a lower() and several comparisons (bounded: unusual spellings are classified
# each time once the cache is full).
PASS, DROP, HOST, LENGTH, CODING, CONNECTION, EXPECT = range(7)
# End-to-end request fields the proxy forwards unchanged but also reads (kinds >= NOTED).
TARGET_MODEL, COMPONENT = range(7, 9)
NOTED = TARGET_MODEL
_SPECIAL = {b"host": HOST, b"content-length": LENGTH, b"transfer-encoding": CODING,
            b"connection": CONNECTION, b"expect": EXPECT,
            b"x-amzn-sagemaker-target-model": TARGET_MODEL,
            b"x-amzn-sagemaker-inference-component": COMPONENT}
_NEVER_NAMED = frozenset({b"close", b"keep-alive", b"host", b"content-length"})
_KINDS: dict[bytes, int] = {}
_KINDS_MAX = 4096


def field_kind(name: bytes) -> int:
    """PASS, DROP (hop-by-hop) or one of the fields the proxy reads itself."""
    kind = _KINDS.get(name)
    if kind is None:
        lname = name.lower()
        kind = _SPECIAL.get(lname, DROP if lname in HOP_BY_HOP else PASS)
        if len(_KINDS) < _KINDS_MAX:
            _KINDS[name] = kind
    return kind


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-cased field names listed in Connection headers (hop-by-hop by declaration)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if field_kind(name) == CONNECTION:
            tokens.update(t.strip().lower() for t in value.split(b","))
    # A client cannot talk the proxy out of framing or routing fields (that would let the
    # body of one request become the next one upstream).
    return frozenset(tokens - _NEVER_NAMED)


def _without(parts: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """`parts` (name, ": ", value, CRLF runs) less the fields in `names` (rare: only when
    a Connection header names extra fields)."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            out += parts[i:i + 4]
    return out


def origin_form(target: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form target, authority or None). Raises Refused for an unusable target."""
    if target[:1] == b"/" or target == b"*":
        return target, None
    lowered = target[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lowered.startswith(scheme):
            rest = target[len(scheme):]
            slash = rest.find(b"/")
            query = rest.find(b"?")
            cut = min(i for i in (slash, query, len(rest)) if i >= 0)
            authority, path = rest[:cut], rest[cut:]
            if not authority or b"@" in authority:
                break
            if not path.startswith(b"/"):
                path = b"/" + path
            return path, authority
    raise Refused(400, "malformed")


def check_request(method: bytes, target: bytes, version: str,
                  headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """The upstream head for a parsed request, or Refused with nginx's answer."""
    if version != "1.1" and version != "1.0":
        raise Refused(400 if version.startswith("0.") else 505, "malformed")
    if method == b"CONNECT":
        raise Refused(405, "malformed")
    path, authority = origin_form(target)
    hosts = codings = 0
    chunked = expect = False
    length = -1
    target = component = None
    named: frozenset[bytes] = frozenset()
    fields: list[bytes] = []
    for name, value in headers:
        kind = _KINDS.get(name)
        if kind is None:
            kind = field_kind(name)
        if kind == PASS:
            fields += (name, b": ", value, b"\r\n")
        elif kind == HOST:
            hosts += 1
            if authority is None:
                fields += (name, b": ", value, b"\r\n")
        elif kind == LENGTH:
            length = int(value)  # llhttp has checked it is one valid number
            fields += (name, b": ", value, b"\r\n")
        elif kind == CODING:
            codings += 1
            chunked = value.strip().lower() == b"chunked"
        elif kind == EXPECT:
            expect = value.strip().lower() == b"100-continue"
        elif kind == CONNECTION and value not in _PLAIN_CONNECTION:
            named = named | connection_tokens([(name, value)])
        elif kind >= NOTED:
            fields += (name, b": ", value, b"\r\n")
            if kind == TARGET_MODEL:
                target = value
            else:
                component = value
    # In nginx's order: Host first, then the transfer coding.
    if hosts > 1 or (hosts == 0 and authority is None and version == "1.1"):
        raise Refused(400, "host")
    if codings and version == "1.0":
        raise Refused(400, "transfer_coding")
    if codings and (codings > 1 or not chunked):
        raise Refused(501, "transfer_coding")
    if named:
        fields = _without(fields, named)
    if authority is not None:
        fields += (b"Host: ", authority, b"\r\n")
    if not chunked:
        fields.append(b"\r\n")
    query = path.find(b"?")
    return RequestHead(b"%b %b HTTP/1.1\r\n%b" % (method, path, b"".join(fields)), chunked,
                       length, expect and version == "1.1" and (chunked or length > 0),
                       path if query < 0 else path[:query], target, component)


def chunked_head_end(length: int) -> bytes:
    """The end of an upstream head whose chunked body turned out `length` bytes long."""
    return b"Content-Length: %d\r\n\r\n" % length


# How an answer's body is framed (RFC 9112 §6.3).
NO_BODY, LENGTH_BODY, CHUNKED_BODY, CLOSE_BODY = range(4)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


@dataclass(slots=True)
class AnswerHead:
    """The client's head for an upstream answer, and how its body travels.

    Attributes:
        head: the bytes for the client.
        framing: how the upstream frames the body (*_BODY).
        chunked: the proxy chunks the body for the client (chunked or close-delimited
            upstream, HTTP/1.1 client).
        keep: the client connection stays open after this answer.
    """

    head: bytes
    framing: int
    chunked: bool
    keep: bool


def answer_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], *,
                is_head: bool, client_1_1: bool, keep: bool) -> AnswerHead:
    """The head sent to the client for a final answer: HTTP/1.1 status line, end-to-end
    fields only, framed for the client (RFC 9112 §6.3, §9.3).

    Args:
        is_head: the request was HEAD (no body, whatever the fields say).
        client_1_1: the client spoke HTTP/1.1 (chunks allowed).
        keep: the client connection may stay open (its request asked for it).
    """
    fields: list[bytes] = []
    named: frozenset[bytes] = frozenset()
    framing = CLOSE_BODY
    for name, value in headers:
        kind = _KINDS.get(name)
        if kind is None:
            kind = field_kind(name)
        if kind == PASS or kind == HOST:
            fields += (name, b": ", value, b"\r\n")
        elif kind == LENGTH:
            fields += (name, b": ", value, b"\r\n")
            if framing == CLOSE_BODY:
                framing = LENGTH_BODY
        elif kind == CODING:
            # chunked last means chunked; any other coding runs until the connection closes
            framing = CHUNKED_BODY if value.rstrip().lower().endswith(b"chunked") else -1
        elif kind == CONNECTION and value not in _PLAIN_CONNECTION:
            named = named | connection_tokens([(name, value)])
        elif kind >= NOTED:
            fields += (name, b": ", value, b"\r\n")
    if framing == -1:
        framing = CLOSE_BODY
    if is_head or status == 204 or status == 304:
        framing = NO_BODY
    if named:
        fields = _without(fields, named)
    chunked = False
    if framing >= CHUNKED_BODY:
        if client_1_1:
            chunked = True
            fields.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep = False  # HTTP/1.0 has no chunks: the body ends when the connection does
    if not keep:
        fields.append(b"Connection: close\r\n")
    elif not client_1_1:
        fields.append(b"Connection: keep-alive\r\n")
    return AnswerHead(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason or _reason(status),
                                                      b"".join(fields)),
                      framing, chunked, keep)


def is_streamed(framing: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """An answer whose body the model sends as it goes (InvokeEndpointWithResponseStream):
    chunked, or close-delimited server-sent events (`text/event-stream`). Its first byte
    and the gaps between its reads are timed; a Content-Length answer is not (its size was
    known before its first byte). Only a close-delimited answer's fields are read (rare)."""
    if framing == CHUNKED_BODY:
        return True
    if framing != CLOSE_BODY:
        return False
    return any(name.lower() == b"content-type" and value[:17].lower() == b"text/event-stream"
               for name, value in headers)


def interim_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A 1xx answer relayed to an HTTP/1.1 client (103 Early Hints and the like)."""
    fields: list[bytes] = []
    for name, value in headers:
        kind = field_kind(name)
        if kind == PASS or kind >= NOTED:
            fields += (name, b": ", value, b"\r\n")
    return b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason or _reason(status), b"".join(fields))


def trailer_section(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The last chunk with the upstream's trailer fields (those allowed in a trailer)."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in _NOT_IN_TRAILERS:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def error_answer(status: int, *, close: bool = True, keep_alive_1_0: bool = False,
                 is_head: bool = False) -> bytes:
    """A small plain-text answer of the proxy's own (its head alone for a HEAD request)."""
    reason = _reason(status)
    body = reason + b"\n"
    connection = (b"Connection: close\r\n" if close else
                  b"Connection: keep-alive\r\n" if keep_alive_1_0 else b"")
    return (b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%b\r\n%b"
            % (status, reason, len(body), connection, b"" if is_head else body))


def is_invocation(path: bytes) -> bool:
    """Requests that are counted: `/invocations` (with any suffix, as SageMaker routes it)
    and a multi-model endpoint's `/models/{name}/invoke`."""
    return classify(b"POST", path)[0] == INVOKE


# What a counted request is (`classify`): an invocation, or a multi-model endpoint's
# load (`POST /models`) or unload (`DELETE /models/{name}`); OTHER is not counted.
OTHER = 0
MAX_MODEL_NAME = 255  # a CloudWatch dimension value is at most 1024 chars; names are shorter


def classify(method: bytes, path: bytes) -> tuple[int, bytes]:
    """(kind, model name from the path) of a request, after SageMaker's multi-model container
    contract (mms-container-apis): `POST /models/{name}/invoke` is an invocation of `name`,
    `POST /models` loads the model named in its JSON body, `DELETE /models/{name}` unloads."""
    if path.startswith(b"/invocations"):
        return INVOKE, b""
    if not path.startswith(b"/models"):
        return OTHER, b""
    if path == b"/models" or path == b"/models/":
        return (LOAD, b"") if method == b"POST" else (OTHER, b"")
    rest = path[8:]
    if path[7:8] != b"/" or not rest:
        return OTHER, b""
    if rest.endswith(b"/invoke") and rest.count(b"/") == 1 and len(rest) > 7:
        return INVOKE, rest[:-7]
    if method == b"DELETE" and b"/" not in rest:
        return UNLOAD, rest
    return OTHER, b""


def path_segment(raw: bytes) -> bytes:
    """A path segment percent-decoded (`/models/my%20model/invoke` names `my model`)."""
    if b"%" not in raw:
        return raw
    from urllib.parse import unquote_to_bytes  # noqa: PLC0415 - rare

    return unquote_to_bytes(raw)


def model_name(raw: bytes) -> str:
    """A model name from a header or a decoded path segment as a dimension value: valid
    UTF-8, control characters replaced, at most MAX_MODEL_NAME characters."""
    text = raw.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text).strip()
    return text[:MAX_MODEL_NAME] or "Unknown"


LOAD_BODY_MAX = 64 * 1024  # bytes of a load request's body kept to read its model_name


def loaded_model_name(body: bytes) -> str | None:
    """The `model_name` of a load request's JSON body (`{"model_name": ..., "url": ...}`),
    or None when the body is not such JSON (never raises)."""
    import json  # noqa: PLC0415 - loads are rare

    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    name = doc.get("model_name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return model_name(name.encode("utf-8", "replace"))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
