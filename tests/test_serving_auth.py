import hmac
import threading

import pytest

from nanochat.serving import auth
from nanochat.serving.auth import AuthError, check_api_key, key_id
from nanochat.serving.ratelimit import SlidingWindowRateLimiter, retry_after_header

KEYS = ["alpha-0123456789abcdef", "beta-0123456789abcdef", "gamma-0123456789abcdef"]


def test_auth_off_without_keys():
    assert check_api_key(None, []) == "anonymous"
    assert check_api_key("Bearer whatever", []) == "anonymous"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(header):
    with pytest.raises(AuthError) as e:
        check_api_key(header, KEYS)
    assert str(e.value) == "Missing Authorization header"


@pytest.mark.parametrize("header", ["Bearer nope", "Basic " + KEYS[0], KEYS[0], "Bearer", "Bearer ",
                                    "Bearer " + KEYS[0][:-1], "Bearer " + KEYS[0] + "x", "Bearer kéy-ünicode"])
def test_invalid_key(header):
    with pytest.raises(AuthError) as e:
        check_api_key(header, KEYS)
    assert str(e.value) == "Invalid API key"


def test_valid_key_returns_id_not_key():
    kid = check_api_key("Bearer " + KEYS[1], KEYS)
    assert kid == key_id(KEYS[1]) and KEYS[1] not in kid
    assert check_api_key("bearer  " + KEYS[2] + " ", KEYS) == key_id(KEYS[2])  # scheme is case-insensitive
    assert len({key_id(k) for k in KEYS}) == len(KEYS)


@pytest.mark.parametrize("header", ["Bearer " + KEYS[0], "Bearer " + KEYS[2], "Bearer wrong"])
def test_compare_digest_against_every_key(monkeypatch, header):
    calls, real = [], hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    try:
        check_api_key(header, KEYS)
    except AuthError:
        pass
    assert len(calls) == len(KEYS)  # no early exit, whichever key matched


# ----------------------------------------------------------------------------- rate limiter

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_sliding_window_and_retry_after():
    clock = FakeClock()
    rl = SlidingWindowRateLimiter(3, 10, clock=clock)
    assert rl.check("a") == (True, 0.0)
    clock.t += 4
    assert rl.check("a")[0] and rl.check("a")[0]  # 3 requests: t=1000, 1004, 1004
    allowed, retry = rl.check("a")
    assert not allowed and retry == pytest.approx(6.0)  # oldest (t=1000) expires at 1010
    clock.t = 1009.5
    assert rl.check("a") == (False, pytest.approx(0.5))  # rejected requests are not counted
    clock.t = 1010.0
    assert rl.check("a") == (True, 0.0)  # a true sliding window: one slot freed, not the whole window
    allowed, retry = rl.check("a")
    assert not allowed and retry == pytest.approx(4.0)  # next oldest is t=1004


def test_retry_after_records_nothing():
    clock = FakeClock()
    rl = SlidingWindowRateLimiter(2, 10, clock=clock)
    assert rl.retry_after("a") == 0.0 and rl.check("a")[0] and rl.retry_after("a") == 0.0
    rl.check("a")
    clock.t += 3
    assert rl.retry_after("a") == pytest.approx(7.0) and rl.retry_after("a") == pytest.approx(7.0)
    clock.t += 7
    assert rl.retry_after("a") == 0.0


def test_keys_are_isolated():
    clock = FakeClock()
    rl = SlidingWindowRateLimiter(1, 60, clock=clock)
    assert rl.check("a")[0]
    assert not rl.check("a")[0]
    assert rl.check("b")[0]


def test_idle_buckets_are_dropped():
    clock = FakeClock()
    rl = SlidingWindowRateLimiter(5, 10, clock=clock)
    for i in range(100):
        rl.check(f"k{i}")
    assert len(rl) == 100
    clock.t += 11
    rl.check("fresh")
    assert len(rl) == 1


def test_retry_after_header_rounds_up():
    assert retry_after_header(0.0) == "1"
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(5.0) == "5"
    assert retry_after_header(5.01) == "6"


def test_invalid_limiter_args():
    with pytest.raises(ValueError):
        SlidingWindowRateLimiter(0, 10)
    with pytest.raises(ValueError):
        SlidingWindowRateLimiter(10, 0)


def test_thread_safety_smoke():
    rl = SlidingWindowRateLimiter(500, 3600)
    allowed = []

    def worker():
        for _ in range(200):
            allowed.append(rl.check("shared")[0])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500 and len(allowed) == 1600
