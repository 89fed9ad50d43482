"""``signalprop sweep CONFIG.yaml [--out DIR] [--executor local|ray]``."""

from __future__ import annotations

import os
from pathlib import Path

import click


def register(group: click.Group) -> None:
    """Add the ``sweep`` command to the CLI group."""
    group.add_command(sweep_cmd)


@click.command("sweep")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Sweep directory (default: sweeps/<hash of the grid>). Re-running on the same "
                   "directory resumes: finished runs are skipped.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: this machine; ray: one Ray task per population.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="local executor: single-threaded worker processes (one per core is fastest).")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads in this process (default: $SIGNALPROP_THREADS or 1).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sweep_cmd(config: str, out: str | None, executor: str, workers: int, threads: int | None,
              progress: bool) -> int:
    """Train every run of the grid in CONFIG (YAML: base, axes, seeds; see docs/sweep.md)."""
    import torch

    from signalprop.sweep import expand_grid, load_grid_file, sweep
    from signalprop.sweep.runner import default_out

    grid = load_grid_file(config)
    specs = expand_grid(grid)  # validate everything before any work
    torch.set_num_threads(threads or int(os.environ.get("SIGNALPROP_THREADS", "1")))
    out_dir = Path(out) if out else default_out(specs)
    n_groups = len({s.group for s in specs})
    click.echo(f"signalprop sweep: {len(specs)} runs in {n_groups} populations -> {out_dir}",
               err=True)
    try:
        res = sweep(grid, out=out_dir, executor=executor, progress=progress, workers=workers)
    except RuntimeError as e:  # another sweep holds the directory
        raise click.ClickException(str(e)) from e
    csv = res.to_csv(out_dir / "results.csv")
    counts = res.status_counts()
    click.echo(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    click.echo(f"results: {out_dir / 'sweep.db'} (table: {csv})")
    return 0 if counts.get("failed", 0) == 0 else 1
