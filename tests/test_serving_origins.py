"""serving/origins: which Host and Origin headers a server answers."""

import pytest

from nanochat.serving.origins import is_loopback, refusal


@pytest.mark.parametrize("host,expected", [("localhost", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                           ("[::1]", True), ("app.localhost", True), ("0.0.0.0", False),
                                           ("192.168.1.2", False), ("evil.example", False), ("", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


@pytest.mark.parametrize("headers,bound,cors,code", [
    ({"host": "127.0.0.1:8000"}, "127.0.0.1", (), None),                    # an API client: no Origin
    ({"host": "localhost:8000"}, "127.0.0.1", (), None),
    ({"host": "[::1]:8000"}, "::1", (), None),
    ({"host": "evil.example:8000"}, "127.0.0.1", (), "host_not_allowed"),    # DNS rebinding
    ({"host": "evil.example"}, "0.0.0.0", (), None),                       # public: any name (keys guard it)
    ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, "127.0.0.1", (), None),  # the UI itself
    ({"host": "127.0.0.1:8000", "origin": "https://evil.example"}, "127.0.0.1", (), "origin_not_allowed"),
    ({"host": "127.0.0.1:8000", "origin": "null"}, "127.0.0.1", (), "origin_not_allowed"),  # file://, sandboxes
    ({"host": "127.0.0.1:8000", "origin": "http://localhost:8000"}, "127.0.0.1", (), "origin_not_allowed"),
    ({"host": "127.0.0.1:8000", "origin": "https://app.example"}, "127.0.0.1", {"https://app.example"}, None),
    ({"host": "127.0.0.1:8000", "origin": "https://other.example"}, "127.0.0.1", {"https://app.example"},
     "origin_not_allowed"),
    ({"host": "127.0.0.1:8000", "origin": "https://any.example"}, "127.0.0.1", {"*"}, None),
])
def test_refusal(headers, bound, cors, code):
    refused = refusal(headers, bound, cors)
    assert (refused and refused[0]) == code
