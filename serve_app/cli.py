"""The ``rbee`` command line."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="rbee: LLM jobs on Ray you can watch live and really cancel.", no_args_is_help=True
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """rbee: LLM jobs on Ray you can watch live and really cancel."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 7835).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A YAML config file (else RBEE_CONFIG).")
    ] = None,
) -> None:
    """Start (or join) Ray, deploy the hive and its HTTP API, and block until Ctrl+C."""
    from serve_app.launch import Hive

    overrides = {
        k: v for k, v in {"server__host": host, "server__port": port}.items() if v is not None
    }
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Hive.start(config_path=config, address=address, **overrides) as hive:
        console.print(f"[bold green]rbee[/] is serving on {hive.url}  (Ctrl+C to stop)")
        if hive.dashboard_url:
            console.print(f"Ray dashboard: {hive.dashboard_url}")
        stop.wait()
        console.print("shutting down ...")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
