"""The kinds study on constructed inputs: each kind's configuration, its row read from a run's
manifests (absorption and probing n/a with the reason), and the report, table and figure."""

from __future__ import annotations

import json

import pytest

from sae_core.config import STUDY_KINDS
from sae_core.errors import ConfigError
from sae_core.stages.saebench import ABSORPTION_SKIPPED
from sae_core.storage.manifests import EvaluationManifest, SaeBenchManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.studies.kinds import (
    KindRow,
    earlier_rows,
    kind_row,
    kinds_figure,
    kinds_table,
    plan_kinds,
    write_kinds_report,
)
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.manifests import example_sae
from tests.helpers.pipeline import run

ALL = ",".join(STUDY_KINDS)
OFF_NOTE = "saebench.enabled=false"


def test_each_kind_is_the_preset_with_its_overrides():
    plans = plan_kinds("tiny", ["sae.k=8"], ALL, ["skip_transcoder:train.tokens=2048"], None)
    by = {p.kind: p.config for p in plans}
    assert [p.kind for p in plans] == list(STUDY_KINDS)
    assert (by["topk"].sae.kind, by["topk"].sae.batch_topk) == ("topk", False)
    assert (by["batch_topk"].sae.kind, by["batch_topk"].sae.batch_topk) == ("topk", True)
    assert (by["matryoshka"].sae.kind, by["matryoshka"].sae.batch_topk) == ("matryoshka", True)
    tc = by["skip_transcoder"]
    assert (tc.model.hook, tc.model.hook_out, tc.model.compile) == ("mlp_in.3", "mlp_out.3", False)
    assert (tc.sae.normalize, tc.train.tokens, tc.sae.k) == ("global", 2048, 8)
    # The user's overrides first, then the kind's, then the user's for the kind.
    assert plans[3].overrides[0] == "sae.k=8" and plans[3].overrides[-1] == "train.tokens=2048"
    # SAEBench runs for every kind (a transcoder's absorption is skipped by the stage).
    assert [p.saebench_off for p in plans] == [None] * 4
    assert all(p.config.saebench.enabled for p in plans)
    # The topk kind is the preset itself: the same SAE address as `saeflow run --preset tiny`.
    assert plan_kinds("tiny", [], "topk", [], None)[0].config.sae == by["topk"].sae.model_copy(
        update={"k": 16}
    )


@pytest.mark.parametrize(
    "kinds, kind_sets, needles",
    [
        ("topk,relu", [], ["--kinds", "'relu'", "topk, batch_topk, matryoshka, skip_transcoder"]),
        ("topk,topk", [], ["--kinds", "once"]),
        ("topk", ["matryoshka:sae.k=4"], ["--kind-set", "not among --kinds"]),
        ("topk", ["topk"], ["--kind-set", "KIND:key.path=value"]),
        ("topk", ["topk:sae.k=99999"], ["sae.k=99999"]),
    ],
)
def test_bad_kinds_are_one_clear_error(kinds, kind_sets, needles):
    with pytest.raises(ConfigError) as err:
        plan_kinds("tiny", [], kinds, kind_sets, None)
    assert all(needle in str(err.value) for needle in needles), str(err.value)


def _commit(store: Store, path: str, manifest) -> DatasetRef:
    with store.writing(path) as writer:
        writer.manifest = manifest
    return DatasetRef(store=store.uri, path=path, fingerprint=path[-4:], rows=1)


@pytest.fixture
def runs(tmp_path):
    """A topk run with SAEBench (absorption below the letter gate) and a transcoder's without."""
    store = Store(str(tmp_path / "store"))
    plans = plan_kinds("tiny", [], "topk", [], None)
    plans += plan_kinds("tiny", ["saebench.enabled=false"], "skip_transcoder", [], None)
    metrics = {"nmse": 0.2, "l0": 15.5, "ce_loss_recovered": 0.9, "dead_fraction": 0.01}
    refs = []
    for plan, fp in zip(plans, ("aaaa", "bbbb"), strict=True):
        sae = _commit(store, f"sae/{fp}", example_sae(fingerprint=fp, device="cpu", n=1152, k=16))
        evaluation = EvaluationManifest(
            fingerprint=fp, sae=sae.uri, n_latents=1152, k=16, tokens="t", baseline="b",
            probe_set=None, metrics=metrics | {"nmse": 0.2 + len(refs)}, seconds={"total": 12.0},
        )  # fmt: skip
        refs.append((plan, sae, _commit(store, f"eval/{fp}", evaluation)))
    bench = SaeBenchManifest(
        fingerprint="cccc", sae=refs[0][1].uri, baseline="b", probe_set="p", letter_set="l",
        metrics={"sparse_probe_acc_k1": 0.71, "absorption_letters": 3.0}, seconds={"total": 30.0},
    )  # fmt: skip
    return refs, _commit(store, "saebench/cccc", bench)


def test_a_row_says_why_a_figure_is_missing(runs):
    (topk, topk_sae, topk_eval), (tc, tc_sae, tc_eval) = runs[0]
    row = kind_row(topk, topk_sae, topk_eval, runs[1], 61.0, {})
    assert (row.n, row.k, row.l0, row.nmse, row.sparse_probe_k1) == (1152, 16, 15.5, 0.2, 0.71)
    assert row.absorption is None and row.absorption_note == (
        "3 letters passed the probe F1 gate, fewer than saebench.min_letters=20"
    )
    assert (row.train_seconds, row.train_timing, row.saebench_seconds) == (61.0, "this run", 30.0)
    assert (row.nmse_target, row.transcoder) == ("resid_post.3", False)
    assert (row.tokens, row.steps, row.seed) == (3840, 15, topk.config.train.seed)
    # The transcoder: no SAEBench; found trained, its time from an earlier report's row.
    earlier = {tc_sae.uri: row._replace(train_seconds=25.0, sae=tc_sae.uri)}
    tc_row = kind_row(tc, tc_sae, tc_eval, None, None, earlier)
    assert (tc_row.absorption, tc_row.absorption_note) == (None, OFF_NOTE)
    assert (tc_row.sparse_probe_k1, tc_row.probing_note) == (None, OFF_NOTE)
    assert (tc_row.nmse_target, tc_row.transcoder, tc_row.nmse) == ("mlp_out.3", True, 1.2)
    assert (tc_row.train_seconds, tc_row.train_timing) == (25.0, "an earlier run of this study")
    assert kind_row(tc, tc_sae, tc_eval, None, None, {}).train_seconds is None


def test_the_report_table_and_figure(runs, tmp_path):
    (topk, topk_sae, topk_eval), (tc, tc_sae, tc_eval) = runs[0]
    rows = [
        kind_row(topk, topk_sae, topk_eval, runs[1], 61.0, {}),
        kind_row(tc, tc_sae, tc_eval, None, None, {}),
    ]
    out = tmp_path / "report"
    report = write_kinds_report(rows, [topk, tc], "tiny", "saeflow study kinds ...", out)
    text = report.read_text()
    table = text.split("## Comparison (eval split)\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0].startswith(
        "| kind | n | k | L0 (eval) | tokens | steps | seed | recipe | NMSE | CE loss recovered |"
    )
    assert table[2] == (
        "| topk | 1152 | 16 | 15.5 | 3,840 | 15 | 0 | n/a | 0.2 | 0.9 | n/a: 3 letters passed the probe F1 "
        "gate, fewer than saebench.min_letters=20 | 0.71 | 0.01 | 0 | 61 | 12 | 30 |"
    )
    assert table[3] == (
        f"| skip_transcoder | 1152 | 16 | 15.5 | 3,840 | 15 | 0 | n/a | 1.2 (y: mlp_out.3) | 0.9 | "
        f"n/a: {OFF_NOTE} | n/a: {OFF_NOTE} | 0.01 | 0 | n/a | 12 | n/a |"
    )
    assert "skip_transcoder: not measured: trained before this study ran, on cpu" in text
    assert (
        "saeflow run --preset tiny --set saebench.enabled=false --set sae.kind=skip_transcoder"
        in text
    )
    assert "--set model.hook=mlp_in.3 --set model.hook_out=mlp_out.3" in text
    assert f"- topk: `{topk_sae.uri}`" in text and "](kinds.png)" in text
    assert (out / "kinds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "table.json").read_text())[1]["absorption_note"] == OFF_NOTE
    assert earlier_rows(out) == {r.sae: r for r in rows}
    assert kinds_table(rows) in text
    # CE loss recovered is NaN where ablating the hook does not hurt: drawn as n/a.
    unhurt = [r._replace(ce_loss_recovered=float("nan"), nmse=-0.0) for r in rows]
    assert kinds_figure(unhurt)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_table_that_is_not_the_studys_is_refused(tmp_path):
    (tmp_path / "table.json").write_text('[{"kind": "topk"}]')
    with pytest.raises(ConfigError, match="--out .*table.json is not a kinds study's table"):
        earlier_rows(tmp_path)
    assert earlier_rows(tmp_path / "new") == {}
    assert KindRow._fields[-1] == "sae"


# Small SAEBench and evaluation samples: seconds on the tiny model.
FAST = ["saebench.absorption_words=60", "saebench.icl_examples=2", "saebench.min_letters=1",
        "saebench.decoder_sample=100", "eval.ablation_samples=0", "eval.probe_contexts=60",
        "eval.probe_tokens=256"]  # fmt: skip


def test_the_study_runs_each_kind_through_the_pipeline(prefect, tiny_preset, tmp_path, capsys):
    from flows.cli.study import kinds

    # The command's function, not typer's runner: Prefect's log handlers would keep the
    # runner's closed output stream and break every flow run after this test.
    out = tmp_path / "kinds"
    kind_set = ["skip_transcoder:sae.dead_window_tokens=1024"]
    kinds(out=str(out), kinds="topk,skip_transcoder", kind_set=kind_set, force=False,
          preset=tiny_preset, set_=FAST, store=None, progress=False)  # fmt: skip
    topk, tc = rows = [KindRow(**row) for row in json.loads((out / "table.json").read_text())]
    assert [r.kind for r in rows] == ["topk", "skip_transcoder"]
    assert (topk.nmse_target, tc.nmse_target, tc.transcoder) == ("resid_post.2", "mlp_out.2", True)
    for r in rows:
        assert (r.n, r.k) == (256, 8) and 0 < r.l0 <= 8 and r.tokens > 0
        assert 0 < r.nmse < 1.5 and r.train_timing == "this run" and r.train_seconds > 0
        assert r.eval_seconds > 0 and r.device == "cpu"
        assert r.steps > 0 and r.recipe in ("budget", "paper") and isinstance(r.seed, int)
    # The tiny model's first-letter probes may pass no letter: a reason, not a figure.
    assert topk.absorption is not None or "letters passed the probe F1 gate" in topk.absorption_note
    assert 0 <= topk.sparse_probe_k1 <= 1
    assert topk.saebench_seconds > 0
    # SAEBench scores the transcoder too, all but absorption, whose protocol does not apply.
    assert (tc.absorption, tc.absorption_note) == (None, ABSORPTION_SKIPPED)
    assert tc.saebench_seconds > 0 and 0 <= tc.sparse_probe_k1 <= 1
    assert (out / "report.md").is_file() and (out / "kinds.png").is_file()
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    # `saeflow run` with a kind's overrides finds every stage the study made.
    plans = plan_kinds(tiny_preset, FAST, "skip_transcoder", kind_set, None)
    assert set(run(plans[0].config).stages.values()) == {"cached"}


def test_bad_study_input_is_one_line_before_any_work(tiny_preset, tmp_path):
    base = ["study", "kinds", "--preset", tiny_preset, "--out", str(tmp_path / "k")]
    assert_one_line_error(invoke(*base, "--kinds", "topk,relu"), "--kinds", "'relu'")
    assert_one_line_error(invoke(*base, "--kind-set", "topk=1"), "--kind-set")
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "x").write_text("")
    assert_one_line_error(invoke(*base), "--out", "not empty")
    assert not (tmp_path / "store").exists()
