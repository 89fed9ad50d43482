"""``signalprop lab list|run`` and ``signalprop report DIR``."""

from __future__ import annotations

import os
import sys
import time

import click

from signalprop.cli.doctor import _env_threads
from signalprop.cli.records import is_record_path, write_record_report


def _say(msg: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


@click.group("lab")
def lab() -> None:
    """Studies that settle the classic claims about vanishing/exploding gradients."""


@lab.command("list")
def lab_list() -> None:
    """List the studies: name, title and the claim each one tests."""
    from signalprop.lab import STUDY_NAMES, get_study  # lazy: numpy (see signalprop.cli)

    for name in STUDY_NAMES:
        mod = get_study(name)
        click.echo(f"{name:18s} {mod.TITLE}")
        click.echo(f"{'':18s}   claim: {mod.CLAIM}")


@lab.command("run")
@click.argument("names", nargs=-1, required=True)
@click.option("--quick", is_flag=True, help="Small configurations (3 seeds each; the whole lab in about 4 min on 2 idle cores).")
@click.option("--out", "out", default="lab-out", show_default=True, type=click.Path(),
              help="Output directory (results, figures, index.html).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Where sweep-based parts run.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--force", is_flag=True, help="Re-run studies whose results are already stored.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes for sweep-based parts and a study's independent training "
              "cells (default: 2 on machines with at least 2 cores, else 1).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (default: 1; small models run faster that way).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the outcomes (verdicts, sentences, numbers, timings) as JSON on stdout "
              "only.")
def lab_run(
    names: tuple[str, ...], quick: bool, out: str, executor: str, device: str, force: bool,
    workers: int | None, threads: int | None, as_json: bool = False,
) -> int:
    """Run studies NAME... (or 'all') and build OUT/index.html."""
    import torch

    from signalprop._device import resolve_device  # lazy: torch (see signalprop.cli)
    from signalprop.errors import check_out_dir  # lazy: torch (see signalprop.cli)
    from signalprop.lab.runner import resolve_names, run_lab  # lazy: torch (see signalprop.cli)

    wanted = resolve_names(list(names))  # fail on a bad name before any work
    resolve_device(device)  # ... on a bad or absent device
    check_out_dir(out)  # ... and on a folder that cannot take the results
    # small models: one intra-op thread is faster than two and leaves a core to the rest
    torch.set_num_threads(threads or _env_threads())
    t0 = time.perf_counter()
    if workers is None:
        workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    outcomes = run_lab(wanted, out, quick=quick, executor=executor, device=device, force=force,
                       workers=workers, log=_say)
    total = time.perf_counter() - t0
    failed = [o.name for o in outcomes if o.status == "failed"]
    if as_json:
        import json
        from dataclasses import asdict

        from signalprop.doctor import _jsonable  # lazy: torch (see signalprop.cli)

        click.echo(json.dumps(_jsonable({
            "report": os.path.join(out, "index.html"), "total_seconds": total,
            "studies": [{"name": o.name, "status": o.status, "run_seconds": o.run_s,
                         "total_seconds": o.total_s, "error": o.error,
                         "figures": [str(f) for f in o.figures],
                         "conclusion": asdict(o.conclusion) if o.conclusion else None}
                        for o in outcomes],
        }), indent=2, allow_nan=False))
        return 1 if failed else 0
    click.echo("")
    for o in outcomes:
        verdict = o.conclusion.verdict if o.conclusion else "FAILED"
        click.echo(f"{o.name:18s} {verdict:13s} {o.total_s:7.1f} s  "
                   f"{o.conclusion.sentence if o.conclusion else o.error}")
    click.echo(f"\n{len(outcomes)} stud{'y' if len(outcomes) == 1 else 'ies'} in {total:.1f} s; "
               f"report: {os.path.join(out, 'index.html')}")
    if failed:
        click.echo(f"failed: {', '.join(failed)} (see {out}/<study>/meta.json)", err=True)
        return 1
    return 0


@click.command("report")
@click.argument("out_dir", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="With a RECORD: the folder for report.html and report.json.")
def report(out_dir: str, out: str | None) -> int:
    """(Re)build OUT_DIR/index.html from the lab results stored in OUT_DIR; or, when it is a saved
    record (record.json.gz from a Probe, a callback or doctor), write the doctor's page for it
    into --out."""
    if is_record_path(out_dir):
        if out is None:
            raise click.UsageError("a RECORD needs --out DIR (where report.html goes)")
        click.echo(str(write_record_report(out_dir, out)))
        return 0
    from signalprop.lab import STUDY_NAMES  # lazy: numpy (see signalprop.cli)
    from signalprop.lab.report import build_report  # lazy: numpy (see signalprop.cli)

    path = build_report(out_dir, order=STUDY_NAMES)
    click.echo(str(path))
    return 0


def register(group: click.Group) -> None:
    """Add ``lab`` and ``report`` to the top-level command group."""
    group.add_command(lab)
    group.add_command(report)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(lab())
