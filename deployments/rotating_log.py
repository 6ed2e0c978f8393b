"""A server's log, capped: `python -m deployments.rotating_log LOG -- COMMAND...` runs COMMAND,
copies its output into LOG and, past `--max-bytes`, renames LOG to LOG.1 (LOG.1 to LOG.2, ...),
keeping `--backups` old files; it exits with COMMAND's exit code. Without a command it copies
its standard input. A long-lived server (MLflow logs as long as it runs) then never fills the
disk.

deployments/process.py starts servers through it: a stop signal to the process group reaches
the server, and this copier outlives it to write its last lines (it ignores the signal and ends
when the server's output does).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

MAX_BYTES = 10 * 2**20
BACKUPS = 3


def _rotate(log: Path, backups: int) -> None:
    for index in range(backups - 1, 0, -1):
        older = log.with_name(f"{log.name}.{index}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{index + 1}"))
    log.replace(log.with_name(f"{log.name}.1"))


def copy_rotating(source, log: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
    """Append each line of `source` (a binary stream) to `log`, rotating before a line that
    would take it past `max_bytes` (a line longer than that gets a file of its own)."""
    out = open(log, "ab")  # noqa: SIM115 - reopened at each rotation
    try:
        size = out.tell()
        for line in iter(source.readline, b""):
            if size and size + len(line) > max_bytes:
                out.close()
                _rotate(log, backups)
                out, size = open(log, "ab"), 0  # noqa: SIM115
            out.write(line)
            out.flush()  # the log is read while the server runs
            size += len(line)
    finally:
        out.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--backups", type=int, default=BACKUPS)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        copy_rotating(sys.stdin.buffer, args.log, args.max_bytes, args.backups)
        return
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)  # the server gets it too; its last lines follow
    copy_rotating(server.stdout, args.log, args.max_bytes, args.backups)
    sys.exit(server.wait())


if __name__ == "__main__":
    main()
