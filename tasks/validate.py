"""Prefect task: check an activations dataset with a Great Expectations suite before training on it.

sae_core.data.validation reduces each shard to flat tables; here an ephemeral GE context checks them
shard by shard (facts, per-token, per-dimension), then the split totals against the manifest, then
an overview with one row per shard. The overview, the split checks and every failed check become
GE data docs (HTML), committed to the store as `validation/<dataset fingerprint>/` with the report
as its manifest, and linked from the flow run's artifacts. great_expectations is imported on first
use: the import alone takes ~5 s.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

import pandas as pd
from prefect import task
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from sae_core.data.validation import ShardSummary, activation_manifest, summarize_dataset
from sae_core.errors import ConfigError, ValidationFailed
from sae_core.stages.location import Location
from sae_core.storage.manifests import ActivationsManifest, ValidationManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tasks.caching import CommittedOutput
from tasks.datadocs import DataDocs

_SHOWN_FAILURES = 12
# Extraction filters norms in torch; numpy recomputes them, so allow rounding at the boundary.
_NORM_RTOL = 1e-4


@cache
def _gx() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    # Some GE modules pin their own logger to INFO (e.g. "created temporary directory").
    for name in ["great_expectations", *logging.root.manager.loggerDict]:
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return gx


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn() outside a flow, e.g. in tests
        return logging.getLogger(__name__)


class _Suites:
    """One ephemeral GE context holding a dataframe asset and a suite per summary table."""

    def __init__(
        self,
        manifest: ActivationsManifest,
        vocab_size: int,
        min_norm: float,
        max_norm: float,
        run_name: str,
    ):
        gx = _gx()
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("saeflow")
        if manifest.max_norm:
            max_norm = min(max_norm, manifest.max_norm * (1 + _NORM_RTOL))
        first = 1 if manifest.skip_first_position else 0
        last = manifest.context_len - 1 if manifest.context_len else None
        width = manifest.width
        expectations = {
            "facts": [
                # The error text itself becomes the example GE reports.
                gxe.ExpectColumnValuesToBeInSet(
                    column="error", value_set=[""], description="unreadable"
                ),
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="dtype_read",
                    column_B="dtype_manifest",
                    ignore_row_if="either_value_is_missing",
                    description="dtype as in manifest",
                ),
            ],
            "tokens": [
                gxe.ExpectTableRowCountToEqual(
                    value={"$PARAMETER": "rows"}, description="row count as in manifest"
                ),
                gxe.ExpectColumnValuesToBeInSet(
                    column="nonfinite", value_set=[0], description="no NaN/inf values"
                ),
                gxe.ExpectColumnValuesToBeBetween(
                    column="norm",
                    min_value=min_norm,
                    max_value=max_norm,
                    description=f"norm in [{min_norm:g}, {max_norm:g}]",
                ),
                gxe.ExpectColumnValuesToNotBeNull(
                    column="token_id", description="token_id present"
                ),
                gxe.ExpectColumnValuesToBeBetween(
                    column="token_id",
                    min_value=0,
                    max_value=vocab_size - 1,
                    description=f"token_id in [0, {vocab_size})",
                ),
                gxe.ExpectColumnValuesToBeBetween(
                    column="position",
                    min_value=first,
                    max_value=last,
                    description=f"position in [{first}, {'?' if last is None else last}]",
                ),
            ],
            "dims": [
                gxe.ExpectTableRowCountToEqual(
                    value=width, description=f"width {width} as in manifest"
                ),
                gxe.ExpectColumnValuesToBeInSet(
                    column="constant", value_set=[False], description="no constant dimension"
                ),
            ],
            "splits": [
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="rows_read",
                    column_B="rows_manifest",
                    description="split rows as in manifest",
                ),
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="rows_listed",
                    column_B="rows_manifest",
                    description="shard rows sum to split rows",
                ),
            ],
            "overview": [
                gxe.ExpectColumnValuesToBeInSet(
                    column="failed", value_set=[""], description="every shard passes"
                ),
            ],
        }
        self._batches = {
            name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            for name in expectations
        }
        self._suites = {
            name: context.suites.add(gx.ExpectationSuite(name=f"saeflow-{name}", expectations=exps))
            for name, exps in expectations.items()
        }
        self.docs = DataDocs(context, run_name)

    def check(
        self,
        table: str,
        frame: pd.DataFrame,
        where: str,
        params: dict[str, Any] | None = None,
        keep: bool = False,
    ) -> list[str]:
        """One line per failed expectation: `where: description: what was seen`. The result goes
        to the data docs if it failed or `keep` is set."""
        batch = self._batches[table].get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(self._suites[table], expectation_parameters=params or {})
        if keep or not result.success:
            self.docs.record(self._suites[table].name, result, where)
        return [
            f"{where}: {r.expectation_config.description}: {_detail(r, params or {})}"
            for r in result.results
            if not r.success
        ]


def _detail(result: Any, params: dict[str, Any]) -> str:
    """What GE saw, in a few words: counts and examples, or observed against expected."""
    info = result.exception_info or {}
    errors = [info] if "raised_exception" in info else list(info.values())
    raised = [
        e.get("exception_message")
        for e in errors
        if isinstance(e, dict) and e.get("raised_exception")
    ]
    if raised:
        return f"check raised: {raised[0]}"
    seen = result.result or {}
    kwargs = result.expectation_config.kwargs
    if "unexpected_count" in seen:
        examples = seen.get("partial_unexpected_list", [])[:3]
        if "column_A" in kwargs:  # pairs: name both sides
            examples = [
                f"{kwargs['column_A']}={a} vs {kwargs['column_B']}={b}" for a, b in examples
            ]
        shown = ", ".join(str(v) for v in examples)
        if seen["element_count"] == 1:  # a one-row table: the example is the whole story
            return shown
        return f"{seen['unexpected_count']} of {seen['element_count']} rows, e.g. {shown}"
    expected = kwargs.get("value")
    if isinstance(expected, dict):
        expected = params.get(expected.get("$PARAMETER"))
    return f"observed {seen.get('observed_value')}, expected {expected}"


def _check_shard(suites: _Suites, summary: ShardSummary) -> list[str]:
    facts = summary.facts
    failures = suites.check("facts", facts.to_frame(), facts.shard)
    if not facts.readable:
        return failures
    failures += suites.check("tokens", summary.tokens, facts.shard, {"rows": facts.rows_manifest})
    failures += suites.check("dims", summary.dims, facts.shard)
    return failures


def _raise_failed(report: ValidationManifest, bad_shards: set[str]) -> None:
    failures = report.failures
    lines = failures[:_SHOWN_FAILURES]
    if len(failures) > len(lines):
        lines.append(f"... and {len(failures) - len(lines)} more")
    lines.append(f"data docs: {report.docs}")
    head = (
        f"activations {report.dataset} failed validation "
        f"({len(bad_shards)} of {report.shards} shards"
    )
    raise ValidationFailed(head + "):\n  " + "\n  ".join(lines))


def _validation_location(ref: DatasetRef, **_: object) -> Location:
    return Location(ref.store, f"validation/{ref.fingerprint}", ref.fingerprint)


def _validated(location: Location, args: dict[str, Any]) -> bool:
    # Both the docs and the dataset they describe: if either is gone, validate again.
    ref: DatasetRef = args["ref"]
    return location.is_committed() and ref.open_store().is_committed(ref.path)


def _link_artifacts(report: ValidationManifest) -> None:
    """The data docs and the outcome as artifacts of the flow run (only inside a Prefect run)."""
    if TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_link_artifact(
        key="validation-docs",
        link=report.docs,
        link_text="Great Expectations data docs",
        description=f"Validation of {report.dataset}",
    )
    outcome = "passed" if report.passed else f"**failed** ({len(report.failures)} checks)"
    failures = "".join(f"\n- `{line}`" for line in report.failures[:_SHOWN_FAILURES])
    create_markdown_artifact(
        key="validation-report",
        markdown=(
            f"### Validation {outcome}\n\n| dataset | shards | rows |\n|---|---|---|\n"
            f"| `{report.dataset}` | {report.shards} | {report.rows} |\n\n"
            f"[data docs]({report.docs}){failures}\n"
        ),
        description="Great Expectations suite over per-shard summaries",
    )


# Cached on the validation folder, which holds the data docs; recomputed when it or the dataset
# it describes is gone.
@task(
    name="validate",
    retries=0,
    persist_result=True,
    result_serializer="json",
    cache_policy=CommittedOutput(locate=_validation_location, is_done=_validated),
)
def validate_activations(
    ref: DatasetRef,
    vocab_size: int,
    min_norm: float = 1e-3,
    max_norm: float = 1e6,
    progress: bool = True,
    raise_on_failure: bool = True,
) -> ValidationManifest:
    """Check every shard of an activations dataset: readable, finite, norms in range, token ids
    in [0, vocab_size), positions in the context, widths, dtypes and row counts as the manifest
    says. Writes the data docs and the report to `validation/<fingerprint>/` on the dataset's store.

    Raises ValidationFailed naming each failing shard and expectation (unless raise_on_failure is
    False, when the report carries them). Cost: one streaming read of the dataset plus ~0.1-0.3 s
    of GE per shard and table, and ~1 s to render the docs.
    """
    if vocab_size < 1 or not 0 <= min_norm < max_norm:
        raise ConfigError(
            f"validate_activations: vocab_size={vocab_size}, min_norm={min_norm}, max_norm={max_norm}: "
            "need vocab_size >= 1 and 0 <= min_norm < max_norm"
        )
    manifest = activation_manifest(ref)
    suites = _Suites(manifest, vocab_size, min_norm, max_norm, f"validate-{ref.fingerprint}")
    failures: list[str] = []
    bad_shards: set[str] = set()
    rows_read: dict[str, int] = {}
    overview: list[dict[str, Any]] = []
    for summary in summarize_dataset(ref, progress=progress):
        facts = summary.facts
        found = _check_shard(suites, summary)
        if found:
            bad_shards.add(facts.shard)
            failures += found
        rows_read[facts.split] = rows_read.get(facts.split, 0) + facts.rows_read
        overview.append({"shard": facts.shard, "rows": facts.rows_read, "failed": "; ".join(found)})
    splits = pd.DataFrame(
        [
            {
                "split": name,
                "rows_manifest": info.rows,
                "rows_listed": sum(shard.rows for shard in info.shards),
                "rows_read": rows_read.get(name, 0),
            }
            for name, info in manifest.splits.items()
        ]
    )
    for i, name in enumerate(splits["split"]):
        failures += suites.check("splits", splits.iloc[[i]], f"split {name}", keep=True)
    suites.check(
        "overview", pd.DataFrame(overview, columns=["shard", "rows", "failed"]), "shards", keep=True
    )
    location = _validation_location(ref)
    with Store(location.store).writing(location.path) as writer:
        report = ValidationManifest(
            fingerprint=ref.fingerprint,
            dataset=ref.uri,
            passed=not failures,
            shards=len(overview),
            rows=sum(rows_read.values()),
            failures=failures,
            docs=suites.docs.publish(writer),
        )
        writer.manifest = report
    _link_artifacts(report)
    if failures and raise_on_failure:
        _raise_failed(report, bad_shards)
    _logger().info(
        "validated %s: %d shards, %d rows, %s; data docs %s",
        ref.uri,
        report.shards,
        report.rows,
        "passed" if report.passed else f"{len(failures)} failures",
        report.docs,
    )
    return report


# A transcoder's output hook's dataset, checked by the same suite under a stage name of its own.
validate_paired = validate_activations.with_options(name="validate_paired")
