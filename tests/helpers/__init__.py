"""What several test folders share: tiny models and corpora, a tiny trained SAE, and the
worker scripts that tests run as subprocesses (run them by path: `HELPERS / "name.py"`)."""

from pathlib import Path

HELPERS = Path(__file__).parent
