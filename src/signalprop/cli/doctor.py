"""``signalprop doctor (--example NAME | path/to/file.py:factory) [--steps N] [--json] [--out DIR]``.

Trains a copy of the model briefly under a probe and prints the diagnosis: a table on the
terminal by default, JSON on stdout with ``--json`` (nothing else goes to stdout then), and the
HTML report, the report JSON and the gzipped record under ``--out DIR``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from signalprop._imports import load_callable


def register(group: click.Group) -> None:
    """Add the ``doctor`` command to the CLI group."""
    group.add_command(doctor_cmd)


def load_target(target: str) -> dict[str, Any]:
    """Import ``path/to/file.py:factory`` and call ``factory()``.

    The factory returns ``(model, data, loss_fn)`` -- ``loss_fn`` may be ``None`` when the
    model returns its own loss (a Hugging Face model given ``labels``) -- or a dict with keys
    ``model``, ``data`` and optionally ``loss_fn`` and ``step_fn`` (``step_fn(model, batch) ->
    loss`` for any other model or batch).

    Returns:
        ``{"model", "data", "loss_fn", "step_fn"}`` (the last two possibly ``None``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed target, the module fails to import, or no such function.
        TypeError: the factory is not callable or returns something else.
    """
    from torch import nn

    from signalprop.errors import check_signature, user_code  # lazy: torch (see signalprop.cli)

    _, sep, fn_name = target.rpartition(":")
    if not sep:
        raise ValueError(
            f"expected TARGET as path/to/file.py:factory, got {target!r} "
            "(or use --example NAME; see --list-examples)"
        )
    fn = load_callable(target, what="factory")
    check_signature(fn, 0, f"the factory {fn_name}()", "take no arguments")
    with user_code("factory"):
        out = fn()
    want = "(model, data, loss_fn) or a dict with model, data and loss_fn or step_fn"
    if isinstance(out, dict):
        unknown = set(out) - {"model", "data", "loss_fn", "step_fn"}
        if unknown or "model" not in out or "data" not in out:
            raise TypeError(f"{fn_name}() must return {want}, got a dict with keys "
                            f"{sorted(out)}")
        parts = {"model": out["model"], "data": out["data"], "loss_fn": out.get("loss_fn"),
                 "step_fn": out.get("step_fn")}
    elif isinstance(out, (tuple, list)) and len(out) == 3:
        parts = {"model": out[0], "data": out[1], "loss_fn": out[2], "step_fn": None}
    else:
        got = f"a {type(out).__name__}" + (f" of length {len(out)}" if isinstance(
            out, (tuple, list)) else "")
        raise TypeError(f"{fn_name}() must return (model, data, loss_fn), got {got}")
    if not isinstance(parts["model"], nn.Module):
        raise TypeError(
            f"{fn_name}() must return (model, data, loss_fn) with model a torch.nn.Module, got "
            f"{type(parts['model']).__name__}"
        )
    for key in ("loss_fn", "step_fn"):
        if parts[key] is not None and not callable(parts[key]):
            raise TypeError(
                f"{fn_name}() must return (model, data, loss_fn) with a callable {key} or None, "
                f"got {type(parts[key]).__name__}"
            )
    return parts


def load_factory(target: str) -> tuple[Any, Any, Any]:
    """``(model, data, loss_fn)`` of :func:`load_target` (``loss_fn`` may be ``None``)."""
    parts = load_target(target)
    return parts["model"], parts["data"], parts["loss_fn"]


_SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def print_report(report: Any, console: Any, top: int = 6) -> None:
    """A readable summary: verdict, one row per finding, the top prescriptions."""
    from rich.markup import escape
    from rich.table import Table

    meta = report.meta
    head = (f"[bold]{escape(str(meta.get('name')))}[/]: " + escape(
        f"{meta.get('model')} on {meta.get('data')}, {meta.get('steps_run')} steps of "
        f"{meta.get('optimizer')} (lr {meta.get('lr')})"))
    console.print(head, highlight=False)
    s = report.summary()
    if s["initial_loss"] is not None:
        end = (f"[red]diverged at step {s['diverged_step']}[/]" if s["diverged"]
               else f"{s['final_loss']:.4g}")
        console.print(f"loss {s['initial_loss']:.4g} -> {end}", highlight=False)
    if report.healthy:
        console.print("[bold green]healthy[/]: no finding.")
    else:
        t = Table(title=f"{len(report.findings)} finding(s)", show_lines=True, expand=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("finding", no_wrap=True)
        t.add_column("evidence", ratio=1)
        for f in report.findings:
            sev = f"[{_SEVERITY_STYLE[f.severity]}]{f.severity}[/]"
            t.add_row(sev, f.kind, escape(f.evidence))
        console.print(t)
        # one finding: its own list (the merged one only adds "[kind]" prefixes)
        rx = report.findings[0].prescriptions if len(report.findings) == 1 else \
            report.prescriptions
        if rx:
            p = Table(title="what to try, best first", expand=True)
            p.add_column("#", justify="right")
            p.add_column("remedy", no_wrap=True)
            p.add_column("why", ratio=1)
            for pr in rx[:top]:
                p.add_row(str(pr.rank), pr.remedy, escape(pr.reason))
            console.print(p)
    if report.trial_table is not None and hasattr(report.trial_table, "rich_table"):
        console.print(report.trial_table.rich_table())
    elif report.trials:
        from signalprop.report.doctor_page import _trial_table  # lazy: torch (see signalprop.cli)

        cols, rows = _trial_table(report.trials)
        t = Table(title="trials")
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in r])
        console.print(t)


@click.command("doctor")
@click.argument("target", required=False)
@click.option("--example", "-e", default=None, help="Run a built-in example (see --list-examples).")
@click.option("--list-examples", is_flag=True, help="List the built-in examples and exit.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default: the example's, "
              "else 200).")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the example's, "
              "else 0.1).")
@click.option("--optimizer", default=None, help="Optimiser name: sgd, momentum, adam, rmsprop, "
              "rprop, ... (default: the example's, else sgd).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Mini-batch size for tensor data.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=click.IntRange(min=-(2**63), max=2**63 - 1), default=0, show_default=True, help="Seed for model "
              "construction and data order.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout only.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write report.html, report.json and record.json.gz into this folder.")
@click.option("--trial/--no-trial", default=False, show_default=True,
              help="Also train the top prescriptions side by side.")
@click.option("--trial-seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Runs per remedy in the trials (paired with the baseline by seed).")
@click.option("--validate", is_flag=True, help="Refuse data containing NaN/Inf up front.")
@click.option("--fail-on-findings", is_flag=True, help="Exit with status 1 when anything is found.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (default: $SIGNALPROP_THREADS or 1).")
def doctor_cmd(
    target: str | None,
    example: str | None,
    list_examples: bool,
    steps: int | None,
    lr: float | None,
    optimizer: str | None,
    batch_size: int | None,
    device: str,
    seed: int,
    as_json: bool,
    out: str | None,
    trial: bool,
    trial_seeds: int,
    validate: bool,
    fail_on_findings: bool,
    threads: int | None,
) -> int:
    """Diagnose a model's signal propagation: train a copy briefly under a probe, then report
    vanishing/exploding gradients, saturation, dead units, NaNs and what to try.

    TARGET is path/to/file.py:factory where factory() returns (model, data, loss_fn); data is a
    DataLoader (of (x, ..., y) tuples or dict batches), tensors or a signalprop Dataset;
    loss_fn may be None when the model returns its loss (Hugging Face models given labels), and
    a dict {model, data, step_fn} takes step_fn(model, batch) -> loss. Or use --example NAME.
    """
    import torch  # lazy: torch takes ~5 s to import; `signalprop --help` stays at ~0.3 s

    from signalprop.examples import EXAMPLES  # lazy: imports torch (see above)
    from signalprop.validation import check_out_dir  # lazy: imports torch (see above)

    if list_examples:
        for name in EXAMPLES.names():
            click.echo(f"{name:16s} {EXAMPLES.entry(name).doc}")
        return 0
    if (target is None) == (example is None):
        raise click.UsageError("give exactly one of TARGET (path/to/file.py:factory) or "
                               "--example NAME")
    torch.set_num_threads(threads or _env_threads())
    if out:  # before any training: a result that cannot be written is found out now
        check_out_dir(out)
    torch.manual_seed(seed)  # model construction in the factory / example
    model, data, loss_fn, settings, name = _model_and_settings(
        target, example, {"steps": steps, "lr": lr, "optimizer": optimizer,
                          "batch_size": batch_size})
    report = _diagnose(model, data, loss_fn, settings, name, as_json, out, device=device,
                       validate=validate, trial=trial, trial_seeds=trial_seeds, seed=seed)
    for w in report.meta.get("warnings", []):
        click.echo(f"signalprop: warning: {w}", err=True)
    _show(report, as_json, out)
    if report.meta.get("interrupted"):  # Ctrl-C: the steps trained are reported and saved
        _say_partial("interrupted", report, out)
        return 130
    return 1 if fail_on_findings and report.findings else 0


def _model_and_settings(target: str | None, example: str | None, overrides: dict[str, Any]
                        ) -> tuple[Any, Any, Any, dict[str, Any], str]:
    """``(model, data, loss_fn, settings, name)`` of the example or the target, the options
    given on the command line overriding the example's settings."""
    from signalprop.examples import load_example  # lazy: imports torch (see doctor_cmd)

    if example is not None:
        (model, data, loss_fn), settings = load_example(example)
        name = example
    else:
        assert target is not None
        parts = load_target(target)
        model, data, loss_fn = parts["model"], parts["data"], parts["loss_fn"]
        settings, name = {}, target.rpartition(":")[2]
        if parts["step_fn"] is not None:
            settings["step_fn"] = parts["step_fn"]
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return model, data, loss_fn, settings, name


def _diagnose(model: Any, data: Any, loss_fn: Any, settings: dict[str, Any], name: str,
              as_json: bool, out: str | None, **kw: Any) -> Any:
    """Run the doctor; an error in the user's code after some steps shows and saves the
    diagnosis of the steps trained before it is raised."""
    from signalprop.doctor import doctor  # lazy: imports torch (see doctor_cmd)
    from signalprop.errors import UserError  # lazy: imports torch (see doctor_cmd)

    try:
        with warnings.catch_warnings():
            # shown below as one 'signalprop: warning:' line each, not twice
            warnings.filterwarnings("ignore", message="the data ran out")
            return doctor(model, data, loss_fn, progress=sys.stderr.isatty(), name=name,
                          **kw, **settings)
    except UserError as e:
        partial = getattr(e, "report", None)
        if partial is None:
            raise
        # nothing trained is lost: show and save the diagnosis of the steps trained so far
        _show(partial, as_json, out)
        _say_partial("stopped by an error", partial, out)
        raise


def _say_partial(what: str, report: Any, out: str | None) -> None:
    n = report.meta.get("steps_run")
    where = f"; partial record and report in {out}" if out else ""
    click.echo(f"signalprop: {what} after {n} step(s): the report above covers the steps "
               f"trained{where}", err=True)


def _env_threads() -> int:
    raw = os.environ.get("SIGNALPROP_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise click.UsageError(f"$SIGNALPROP_THREADS must be an integer >= 1, got {raw!r}")
    return n


def echo_report(report: Any, as_json: bool) -> Any:
    """The report on stdout: its JSON only, or the tables; the rich console the tables went
    to (``None`` with ``as_json``)."""
    from rich.console import Console

    if as_json:
        click.echo(report.to_json())
        return None
    console = Console(width=max(100, Console().width))
    print_report(report, console)
    return console


def _show(report: Any, as_json: bool, out: str | None) -> None:
    """Print the report (first: a failed save must not hide the diagnosis), then save it."""
    echo_report(report, as_json)
    if out:
        paths = report.save(out)
        if not as_json:
            click.echo(f"report: {paths['html']}\nrecord: {paths['record']}\n"
                       f"json:   {paths['json']}")
