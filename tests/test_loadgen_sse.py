"""Stream parsing on raw bytes split at every awkward place: SSE events, HTTP/1.1 framing, and
the OpenAI chunk payloads the client times."""

import msgspec
import pytest

from loadgen.client import RequestFailed, _on_event, error_text
from loadgen.sse import SSEParser
from loadgen.transport import ProtocolError, ResponseParser

STREAM = (
    b'data: {"choices":[{"text":"Hel"}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"text":"lo"}]}\r\n\r\n'
    b"event: message\nid: 3\ndata: line one\ndata: line two\n\n"
    b"data:no-space\r\rdata\n\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
EVENTS = [
    b'{"choices":[{"text":"Hel"}]}',
    b'{"choices":[{"text":"lo"}]}',
    b"line one\nline two",
    b"no-space",
    b"",
    b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
    b"[DONE]",
]


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    parser, events, last = SSEParser(), [], 0
    for cut in cuts + [len(data)]:
        events += parser.feed(data[last:cut])
        last = cut
    return events + parser.close()


def test_whole_stream_in_one_chunk():
    assert parse_in_pieces(STREAM, []) == EVENTS


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_every_single_split_point(cut):
    assert parse_in_pieces(STREAM, [cut]) == EVENTS


def test_byte_by_byte():
    assert parse_in_pieces(STREAM, list(range(1, len(STREAM)))) == EVENTS


def test_crlf_split_between_chunks_is_one_line_end():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    # A trailing CR could still become a CRLF, so the blank line is only certain one byte later.
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [b"a\nb"]


def test_last_event_without_blank_line_is_kept_at_close():
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == [b"[DONE]"]


def test_completion_and_chat_chunks_are_timed_only_when_they_carry_output():
    times = []
    assert _on_event(b'{"choices":[{"text":"a","index":0}]}', 1.0, times) is None
    _on_event(b'{"choices":[{"text":""}]}', 2.0, times)  # empty text: no output
    _on_event(b'{"choices":[{"delta":{"role":"assistant"}}]}', 3.0, times)  # role-only chat chunk
    _on_event(b'{"choices":[{"delta":{"content":"b"}}],"extra":{"x":[1,2]}}', 4.0, times)
    _on_event(b'{"choices":[{"delta":{"reasoning_content":"hmm"}}]}', 5.0, times)
    usage = _on_event(b'{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}', 6.0, times)
    assert _on_event(b"[DONE]", 7.0, times) is None
    assert times == [1.0, 4.0, 5.0]
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 3)


@pytest.mark.parametrize("payload", [b'{"error":{"message":"boom","code":500}}',
                                     b'{"object":"error","message":"boom"}'])
def test_error_events_fail_the_request(payload):
    with pytest.raises(RequestFailed, match="boom"):
        _on_event(payload, 0.0, [])


def test_malformed_event_raises():
    with pytest.raises(msgspec.DecodeError):
        _on_event(b"{not json", 0.0, [])


def test_error_bodies():
    assert error_text(b'{"error":{"message":"too long","type":"BadRequest"}}') == "too long"
    assert error_text(b'{"object":"error","message":"nope"}') == "nope"
    assert error_text(b'{"detail":"Not Found"}') == "Not Found"
    assert error_text(b"<html>502</html>") == "<html>502</html>"


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\ndata: a\r\n"
    b"9;ext=1\r\n\n\ndata: b\r\n"
    b"2\r\n\n\n\r\n"
    b"0\r\nX-Trailer: t\r\n\r\n"
)


def feed_http(data: bytes, cuts: list[int], **kwargs) -> tuple[ResponseParser, bytes]:
    parser, body, last = ResponseParser(**kwargs), b"", 0
    for cut in cuts + [len(data)]:
        body += b"".join(parser.feed(data[last:cut]))
        last = cut
    return parser, body


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_chunked_framing_split_anywhere(cut):
    parser, body = feed_http(CHUNKED, [cut])
    assert parser.done and parser.keep_alive and parser.status == 200
    assert body == b"data: a\n\ndata: b\n\n"
    assert (b"Content-Type", b"text/event-stream") in parser.headers


def test_chunked_framing_byte_by_byte():
    parser, body = feed_http(CHUNKED, list(range(1, len(CHUNKED))))
    assert parser.done and body == b"data: a\n\ndata: b\n\n"


def test_content_length_and_connection_close():
    response = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    parser, body = feed_http(response, [20, 60])
    assert (parser.status, body, parser.done, parser.keep_alive) == (400, b"hello", True, False)


def test_interim_response_and_empty_body():
    parser, body = feed_http(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", [10])
    assert (parser.status, body, parser.done) == (204, b"", True)


def test_body_until_close():
    parser, body = feed_http(b"HTTP/1.0 200 OK\r\n\r\nsome bytes", [])
    assert body == b"some bytes" and not parser.done and not parser.keep_alive
    parser.feed_eof()
    assert parser.done


def test_truncated_responses_are_errors():
    parser, _ = feed_http(CHUNKED[:-10], [])
    with pytest.raises(ProtocolError):
        parser.feed_eof()
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n")
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
