"""The traffic probe's UDP request and answer (pure functions: the probe's
real exchanges run in the lab's namespaces, tests/test_e2e_services.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from pcn_lab.probe import UDP_HELLO, UDP_MAX, udp_answer, udp_request


def test_plain_hello_gets_the_bare_json_answer() -> None:
    assert udp_request(len(UDP_HELLO)) == UDP_HELLO
    answer = json.loads(udp_answer(UDP_HELLO, ("10.244.1.11", 40000)))
    assert answer["len"] == 9 and answer["peer"] == "10.244.1.11"
    assert answer["sha256"] == hashlib.sha256(UDP_HELLO).hexdigest()


@pytest.mark.parametrize("size,reply", [(4000, 4000), (4000, 0), (100, 9000), (UDP_MAX, 20)])
def test_a_request_asks_for_an_answer_of_its_size(size: int, reply: int) -> None:
    req = udp_request(size, reply)
    assert len(req) == size and req.startswith(UDP_HELLO + b" reply=")
    raw = udp_answer(req, ("10.244.1.11", 40000))
    answer = json.loads(raw)  # the padding is whitespace
    assert (answer["len"], answer["sha256"]) == (size, hashlib.sha256(req).hexdigest())
    assert len(raw) == max(reply, len(raw.rstrip(b" ")))  # padded, never cut


@pytest.mark.parametrize("size,reply", [(10, 0), (UDP_MAX + 1, 0), (4000, UDP_MAX + 1)])
def test_impossible_requests_are_refused(size: int, reply: int) -> None:
    with pytest.raises(ValueError):
        udp_request(size, reply)
