"""The ``signalprop`` command line: a thin layer over the Python API (click).

Sub-commands live in sibling modules, each exposing ``register(group)``:
``doctor`` (doctor.py), ``theory`` (theory.py), ``sweep`` (sweep.py), ``lab``/``report`` (lab.py),
``diagnose`` (records.py).

Errors the user can fix (bad names, missing files, bad data) are printed as one readable line on
stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from signalprop import __version__

_COMMAND_MODULES = ("doctor", "theory", "sweep", "lab", "records")

#: Exceptions that mean "the user asked for something wrong": one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError, ImportError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signalprop")
def cli() -> None:
    """signalprop: measure, diagnose and cure vanishing and exploding gradients."""


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        modname = f"signalprop.cli.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            # a sub-command module absent from this installation is skipped; anything else
            # missing (a real import error inside it) must surface
            if e.name != modname:
                raise
            continue
        mod.register(cli)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit status (used by tests and the console script)."""
    try:
        rv = cli.main(args=argv, prog_name="signalprop", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return int(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("signalprop: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"signalprop: error: {msg}", file=sys.stderr)
        return 2
    return int(rv) if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
