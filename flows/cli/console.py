"""The console every command prints its tables and messages to."""

from rich.console import Console

console = Console()
