"""A stop request: nothing until one is made, then every check raises it; the first signal wins."""

from __future__ import annotations

import signal

import pytest

from sae_core import stopping

pytestmark = pytest.mark.usefixtures("stop_request")


def test_checks_pass_until_a_stop_is_requested_then_each_one_raises_it():
    stopping.check()
    assert stopping.requested() is None
    assert stopping.request(signal.SIGTERM)
    assert not stopping.request(signal.SIGINT)  # the first request names the signal
    for _ in range(2):
        with pytest.raises(stopping.StopRequested, match="stopped by SIGTERM") as stop:
            stopping.check()
        assert stop.value.signum == signal.SIGTERM
    assert not isinstance(stop.value, Exception)  # no `except Exception` swallows it
    stopping.reset()
    stopping.check()
    assert stopping.requested() is None
