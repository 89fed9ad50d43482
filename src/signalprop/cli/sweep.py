"""``signalprop sweep CONFIG.yaml [--out DIR] [--executor local|ray]``."""

from __future__ import annotations

from pathlib import Path

import click

from signalprop.cli.doctor import _env_threads


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
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="local executor: single-threaded worker processes (one per core is fastest).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads in this process (default: $SIGNALPROP_THREADS or 1).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--max-runs", type=click.IntRange(min=1), default=None,
              help="Refuse grids of more runs than this, counted before expanding (default: "
              "2000).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary (status counts, paths, every run's metrics) on stdout "
              "only.")
def sweep_cmd(config: str, out: str | None, executor: str, workers: int, threads: int | None,
              progress: bool, max_runs: int | None, as_json: bool = False) -> int:
    """Train every run of the grid in CONFIG (YAML: base, axes, seeds; see docs/sweep.md)."""
    import torch

    from signalprop.errors import check_out_dir  # lazy: torch (see signalprop.cli)
    from signalprop.sweep import (  # lazy: torch (see signalprop.cli)
        expand_grid,
        load_grid_file,
        sweep,
    )
    from signalprop.sweep.grid import MAX_RUNS  # lazy: torch (see signalprop.cli)
    from signalprop.sweep.runner import default_out  # lazy: torch (see signalprop.cli)

    max_runs = max_runs or MAX_RUNS
    grid = load_grid_file(config)
    specs = expand_grid(grid, max_runs=max_runs)  # validate everything before any work
    torch.set_num_threads(threads or _env_threads())
    out_dir = Path(out) if out else default_out(specs)
    check_out_dir(out_dir)
    n_groups = len({s.group for s in specs})
    click.echo(f"signalprop sweep: {len(specs)} runs in {n_groups} populations -> {out_dir}",
               err=True)
    try:
        res = sweep(grid, out=out_dir, executor=executor, progress=progress, workers=workers,
                    max_runs=max_runs)
    except RuntimeError as e:  # another sweep holds the directory
        raise click.ClickException(str(e)) from e
    csv = res.to_csv(out_dir / "results.csv")
    counts = res.status_counts()
    if not as_json:
        click.echo(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    for r in res.runs:
        if r["status"] == "failed":  # each failed run's reason, not just a count
            labels = ", ".join(f"{k}={v}" for k, v in (r.get("labels") or {}).items())
            why = next((ln for ln in str(r.get("error") or "").splitlines() if ln.strip()),
                       "no error recorded")
            click.echo(f"failed run {r['run_id']}{f' ({labels})' if labels else ''}: {why}",
                       err=True)
    if as_json:
        import json

        from signalprop.doctor import _jsonable  # lazy: torch (see signalprop.cli)

        click.echo(json.dumps(_jsonable({
            "out": str(out_dir), "database": str(out_dir / "sweep.db"), "table": str(csv),
            "n_runs": len(specs), "n_populations": n_groups, "status": counts,
            "runs": [{k: r.get(k) for k in ("run_id", "grp", "labels", "status", "metrics",
                                            "error")} for r in res.runs],
        }), indent=2, allow_nan=False))
    else:
        click.echo(f"results: {out_dir / 'sweep.db'} (table: {csv})")
    return 0 if counts.get("failed", 0) == 0 else 1
