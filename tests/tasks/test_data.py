"""The data stages' tasks under a flow that logs prints, as the pipeline's does: what a fresh
sample run sends to the Prefect server."""

from __future__ import annotations

import re

from prefect import flow

from tests.helpers.pipeline import tiny_config

# An opcode column of dis output, e.g. "  8 LOAD_FAST   0 (batch)".
BYTECODE = re.compile(r"\b(RESUME|LOAD_(FAST|DEREF|CONST|GLOBAL)|PRECALL|RETURN_VALUE)\b")


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_a_fresh_sample_run_logs_no_bytecode(prefect, tiny_llama_dir, tiny_corpus_dir, tmp_path):
    from tasks.data import sample_tokens

    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path / "store"))

    @flow(log_prints=True)  # as flows/pipeline.py's
    def sample():
        return sample_tokens(config.store, config.model, config.data, progress=False)

    state = sample(return_state=True)
    assert state.is_completed()
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any("Finished in state Completed" in line for line in logs), logs  # logs were read
    assert not [line for line in logs if BYTECODE.search(line)], logs
