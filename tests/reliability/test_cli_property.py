"""Property: every `saeflow` command, given any arguments, succeeds or refuses cleanly (exit code
2: one `error:` line, or click's usage error for a malformed command line); no exception escapes
as a traceback.

The commands are read from the Typer app, so a new command is driven without a change here. The
work a command starts once its input is accepted (a flow, a benchmark, a server) is replaced by
`ReachedWork`: getting there counts as success, and the example stays fast. Everything the
commands may write goes to a temporary folder (the working directory, SAEFLOW_HOME, the store
and output paths drawn); S3 points at a closed port. `CLI_PROPERTY_EXAMPLES=N` sets the
examples per command (default 6).
"""

from __future__ import annotations

import gzip
import os
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import app
from tests.reliability.test_config_property import PATHS


class ReachedWork(Exception):
    """Raised in place of the long work an accepted command starts."""


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"services up": its click command, ...}: every leaf of the command tree."""
    found = {}
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a group
            found |= _commands(command, path)
        else:
            found[" ".join(path)] = command
    return found


def _scalar(annotation: Any) -> Any:
    """The type one value of a parameter has: int for `int`, str for `list[str] | None`, the
    Literal itself for a choice."""
    while typing.get_origin(annotation) is not Literal and typing.get_args(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


COMMANDS = _commands(typer.main.get_command(app))
# Paths a command writes: drawn only from the temporary folder's names (never /, ~ or ..).
WRITTEN = {"--store", "--out", "--export"}
EXAMPLES = int(os.environ.get("CLI_PROPERTY_EXAMPLES", "6"))


def _reach(*_: Any, **__: Any) -> Any:
    raise ReachedWork


class _Flow:
    def with_options(self, **_: Any) -> Any:
        return _reach


class Hostile(dict[str, list[str]]):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not thousands of "["
        return "hostile"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_preset: Path) -> Hostile:
    """Values worth trying, by role: paths in a temporary folder (files of every awkward kind)
    and text that broke parsers before."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("hello\n")
    (root / "packed.txt").write_bytes(gzip.compress(b"words " * 100))
    (root / "list.json").write_text("[1, 2]")
    (root / "cfg-list").mkdir()
    (root / "cfg-list" / "cfg.json").write_text("[]")
    (root / "dup.yaml").write_text("sae: {}\nsae: {}\n")
    (root / "deep.yaml").write_text("sae: " + "[" * 50_000)
    os.mkfifo(root / "fifo")
    paths = [str(root / name) for name in ("empty", "file.txt", "packed.txt", "list.json",
                                             "cfg-list", "dup.yaml", "deep.yaml", "fifo")]  # fmt: skip
    written = [str(root / "new" / "out"), str(root / "empty"), str(root / "file.txt"), "",
               "file:///etc", "/etc", "s3://bucket/prefix", "s3://KEY:SECRET@bucket/p"]  # fmt: skip
    text = ["", " ", "x" * 5000, "a\0b", "-5", "0", "70000", "nan", "inf", "1e-9", "2**70",
            "[" * 50_000, "models:/nosuch@champion", "models:/nosuch/1", "saeflow-demo",
            "../../etc", "/dev/zero", "{a: 1}", "!!python/object:os.system", "sae.k=abc",
            "sae.k=" + "[" * 50_000, "k=v", "=", "é\u202e", str(tiny_preset), "demo"]  # fmt: skip
    return Hostile(path=paths, written=written, text=text + paths)


def _free_text() -> st.SearchStrategy[str]:
    # Relative names only (the working directory is temporary); no surrogates (not UTF-8).
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=20).filter(
        lambda t: not t.startswith(("/", "~")) and ".." not in t and t not in (".", "")
    )


def _value(param: Any, hostile: Hostile) -> st.SearchStrategy[str]:
    names = {*param.opts}
    if names & WRITTEN:
        return st.sampled_from(hostile["written"])
    kind = _scalar(param.type_descriptor.annotation)
    if typing.get_origin(kind) is Literal:
        return st.sampled_from([str(c) for c in typing.get_args(kind)]) | st.sampled_from(
            hostile["text"]
        )
    if kind is int:
        numbers = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 65535, 65536, -1])
        return numbers.map(str) | st.sampled_from(hostile["text"])
    if kind is float:
        return st.floats().map(str) | st.sampled_from(hostile["text"])
    if "--set" in names:
        keys = st.sampled_from([p for p in PATHS if p != "store"])
        values = st.sampled_from(hostile["path"] + hostile["text"]) | _free_text()
        return st.builds(lambda k, v: f"{k}={v}", keys, values) | st.sampled_from(hostile["text"])
    return st.sampled_from(hostile["text"]) | _free_text()


@st.composite
def command_lines(draw: st.DrawFn, name: str, hostile: Hostile) -> list[str]:
    """`name`'s words, then each of its parameters left out or given a drawn value."""
    args = name.split()
    for param in COMMANDS[name].params:
        if param.param_type_name == "argument":
            count = draw(st.integers(0, 2)) if param.nargs == -1 else 1
            args += [draw(_value(param, hostile)) for _ in range(count)]
        elif draw(st.booleans()):
            if param.is_flag:
                args.append(draw(st.sampled_from(param.opts + param.secondary_opts)))
            else:
                for _ in range(draw(st.integers(1, 2)) if param.multiple else 1):
                    args += [param.opts[0], draw(_value(param, hostile))]
    return args


@pytest.fixture
def bounded(monkeypatch, tmp_path: Path) -> dict[str, str]:
    """Long work replaced by ReachedWork; a temporary working directory; the environment."""
    import deployments.seaweedfs
    import flows.frontier
    import flows.pipeline
    import flows.sweep
    from deployments.services import SERVICES
    from flows.cli import study
    from sae_core.bench import extract, group, hashing, load, startup, train_step

    for module, name in ((flows.pipeline, "pipeline"), (flows.sweep, "sweep"),
                         (flows.frontier, "frontier")):  # fmt: skip
        monkeypatch.setattr(module, name, _Flow())
    # The benchmarks' work (a drawn --repeats can run for hours: bench hash re-hashed the demo
    # model's 541 MB for as many repeats as the draw asked) ends where it would begin.
    for module, name in ((train_step, "bench_train"), (extract, "bench_extract"),
                         (load, "bench_load"), (group, "bench_group"), (startup, "bench_cli"),
                         (hashing, "bench_hash"),
                         (deployments.seaweedfs, "start"), (study, "activations_of")):  # fmt: skip
        monkeypatch.setattr(module, name, _reach)
    for service in SERVICES.values():
        monkeypatch.setattr(service, "up", _reach)
    monkeypatch.chdir(tmp_path)
    return {
        "SAEFLOW_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "home" / "prefect"),
        "MLFLOW_TRACKING_URI": None,  # type: ignore[dict-item]
        "SAEFLOW_STORE": None,  # type: ignore[dict-item]
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }


def assert_clean(args: list[str], result: Any) -> None:
    """Success, or exit code 2 with an `error:` line or click's usage error; no traceback."""
    shown = f"saeflow {' '.join(a[:60] for a in args)}\n{result.output[-2000:]}"
    if isinstance(result.exception, ReachedWork):
        return
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        shown,
        repr(result.exception),
    )
    assert "Traceback" not in result.output, shown
    if result.exit_code != 0:
        assert result.exit_code == 2, shown
        lines = [line for line in result.output.splitlines() if line.strip()]
        usage = any("Usage:" in line for line in lines)
        assert usage or lines[-1].startswith("error: "), shown


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_any_arguments_succeed_or_are_refused_cleanly(
    name: str, hostile: Hostile, bounded: dict[str, str]
) -> None:
    runner = CliRunner()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(args=command_lines(name, hostile))
    def check(args: list[str]) -> None:
        assert_clean(args, runner.invoke(app, args, env=bounded))

    check()


def test_every_command_is_driven() -> None:
    """The enumeration finds the commands (a new one is driven without a change here)."""
    assert {"run", "sweep", "frontier", "config", "view", "promote", "export", "import",
            "services up", "bench train"} <= set(COMMANDS)  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["promote", "a\0b"],
        ["config", "--store", ""],
        ["config", "--preset", "{dup}"],
        ["config", "--set", "sae.k=" + "[" * 50_000],
        ["config", "--set", "train.seed=36893488147419103232"],
        ["config", "--preset", "[/]\nx"],
    ],
)
def test_known_hostile_command_lines(
    args: list[str], hostile: Hostile, bounded: dict[str, str]
) -> None:
    """Cases of issue 28, and the two the property found (a newline and Rich markup in a
    value), through the same check; each failed it before the fix."""
    dup = next(p for p in hostile["path"] if p.endswith("dup.yaml"))
    args = [a.replace("{dup}", dup) for a in args]
    result = CliRunner().invoke(app, args, env=bounded)
    assert_clean(args, result)
    assert result.exit_code == 2 and result.output.strip().startswith("error: "), result.output
