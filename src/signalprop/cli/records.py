"""``signalprop diagnose RECORD [--json]`` and the record form of ``signalprop report``:
a saved record (from ``Probe``, the Lightning or Hugging Face callback, or ``doctor --out``)
gives the same findings, JSON and HTML page as ``signalprop doctor``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from signalprop.cli.doctor import echo_report


def register(group: click.Group) -> None:
    """Add the ``diagnose`` command to the CLI group."""
    group.add_command(diagnose_cmd)


def is_record_path(path: str | Path) -> bool:
    """Whether ``path`` names a record file (or a folder holding ``record.json.gz``)."""
    p = Path(path)
    if p.is_dir():
        return (p / "record.json.gz").is_file() and not (p / "index.html").exists()
    return p.name.endswith((".json.gz", ".json"))


def load_record(path: str | Path) -> Any:
    """Load a record file, or ``DIR/record.json.gz`` for a folder a callback or doctor wrote."""
    from signalprop.record import Record  # lazy: numpy (see signalprop.cli)

    p = Path(path)
    if p.is_dir():
        p = p / "record.json.gz"
    if not p.exists():
        raise FileNotFoundError(f"no record at {str(p)!r}")
    try:
        return Record.load(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(p)!r} is not a signalprop record: {type(e).__name__}: {e}") from e


def report_for(path: str | Path) -> Any:
    """The doctor's :class:`~signalprop.doctor.Report` of a saved record."""
    # lazy: torch (see signalprop.cli)
    from signalprop.integrations.common import report_from_record

    return report_from_record(load_record(path))


@click.command("diagnose")
@click.argument("record", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout only.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write report.html, report.json and record.json.gz into this folder.")
@click.option("--fail-on-findings", is_flag=True, help="Exit with status 1 when anything is found.")
def diagnose_cmd(record: str, as_json: bool, out: str | None, fail_on_findings: bool) -> int:
    """Diagnose a saved RECORD (record.json.gz from a Probe, a callback or doctor --out, or the
    folder holding it): the same findings and prescriptions as ``signalprop doctor``."""
    report = report_for(record)
    paths = report.save(out) if out else None
    console = echo_report(report, as_json)
    if paths and console is not None:
        console.print(f"report: {paths['html']}", highlight=False)
    return 1 if fail_on_findings and report.findings else 0


def write_record_report(record: str, out: str) -> Path:
    """``signalprop report RECORD --out DIR``: the doctor's page (and JSON) of a saved record."""
    return report_for(record).save(out)["html"]
