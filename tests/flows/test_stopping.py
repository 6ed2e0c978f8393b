"""Ctrl-C and SIGTERM as a stop request: inside a flow's body the first signal asks the loops to
stop and the flow ends Cancelled; a second signal, or one before any loop would check, interrupts
at once; the command then ends with one line on stderr and exit code 128 + the signal.

The same with a real `saeflow run` and a real signal to its process group:
tests/reliability/test_signals.py (slow).
"""

from __future__ import annotations

import os
import signal

import pytest
import typer

from flows.cli.errors import one_line_errors
from flows.stopping import cancelled_on_stop, stop_on_signals
from sae_core import stopping

pytestmark = pytest.mark.usefixtures("stop_request")


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (main) thread, right after


def test_in_a_flow_body_ctrl_c_requests_a_stop_that_the_next_check_honours():
    reached = []

    @cancelled_on_stop
    def body() -> str:
        _ctrl_c()
        reached.append("after the signal")  # no KeyboardInterrupt where the signal landed
        stopping.check()
        return "finished"

    state = body()
    assert reached == ["after the signal"]
    assert state.is_cancelled() and "stopped by SIGINT" in state.message
    assert stopping.requested() == signal.SIGINT


def test_a_second_signal_interrupts_at_once():
    @cancelled_on_stop
    def body() -> None:
        _ctrl_c()
        _ctrl_c()  # a loop that never checks: the second Ctrl-C gets out of it

    with pytest.raises(KeyboardInterrupt):
        body()


def test_outside_a_flow_body_a_signal_interrupts_at_once_and_is_remembered():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopping.requested() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored after the block


def test_a_stopped_flow_run_is_cancelled_on_the_prefect_server(prefect):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import CancelledRun

    @flow(name="stopped-in-a-loop")
    @cancelled_on_stop
    def looping(steps: int, ctrl_c_at: int | None = None) -> int:
        for step in range(steps):
            if step == ctrl_c_at:
                _ctrl_c()
            stopping.check()
        return steps

    state = looping(5, ctrl_c_at=2, return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state is not None and run.state.is_cancelled(), run.state
    with pytest.raises(CancelledRun, match="stopped by SIGINT"):
        looping(5)  # the request stands until reset: the next flow stops at its first check
    stopping.reset()
    assert looping(5) == 5


@pytest.mark.parametrize(
    ("raised", "signum", "code"),
    [
        (stopping.StopRequested(signal.SIGINT), signal.SIGINT, 130),
        (KeyboardInterrupt(), signal.SIGINT, 130),
        (RuntimeError("whatever the run raised on its way out"), signal.SIGTERM, 143),
    ],
)
def test_a_stopped_command_ends_with_one_line_on_stderr(capsys, raised, signum, code):
    stopping.request(signum)
    with pytest.raises(typer.Exit) as end, one_line_errors():
        raise raised
    assert end.value.exit_code == code
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"stopped by {signal.Signals(signum).name}: ") and "resume" in line


def test_without_a_stop_request_a_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError), one_line_errors():
        raise RuntimeError("a bug")
