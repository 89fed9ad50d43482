"""The ``signalprop`` command line: a thin layer over the Python API (click).

Sub-commands live in sibling modules, each exposing ``register(group)``:
``doctor`` (doctor.py), ``theory`` (theory.py), ``sweep`` (sweep.py), ``lab``/``report`` (lab.py),
``diagnose`` (records.py).

Errors the user can fix (bad names, missing files, bad data, an unwritable folder, an error inside
the user's own model or loss) are printed as one readable line on stderr with exit status 2; the
full traceback only with ``signalprop --debug ...`` (or ``SIGNALPROP_DEBUG=1``). A ``TypeError`` or
``KeyError`` counts as a user error only when signalprop raised it on purpose: one that Python
raises inside signalprop is a bug and keeps its traceback.

Imports marked ``# lazy: torch (see signalprop.cli)`` stay inside the commands on purpose:
``import signalprop.cli`` takes ~0.3 s and ``signalprop --help`` answers at once, while any
module that imports torch costs ~3-5 s more (measured on 2 cores: ``signalprop.errors`` 5.3 s,
``signalprop.doctor`` 7.4 s, ``signalprop.cli`` 0.28 s). ``# lazy: numpy`` ones save ~0.1 s.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys

import click

from signalprop import __version__

_COMMAND_MODULES = ("doctor", "theory", "sweep", "lab", "records")

#: Exceptions that mean "the user asked for something wrong": one line, exit 2 (``TypeError`` and
#: ``KeyError`` only when raised on purpose by signalprop; see :func:`is_user_error`).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError, ImportError, OSError)

#: sqlite errors that come from the environment (disk full, read-only, locked), not from a bug.
_SQLITE_ENV = ("disk", "readonly", "read-only", "unable to open", "locked", "full")

_STATE = {"debug": False}


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is something the user can fix (printed as one line) rather than a bug."""
    from signalprop.errors import deliberate  # lazy: torch (see signalprop.cli)

    if isinstance(e, sqlite3.OperationalError):
        return any(w in str(e).lower() for w in _SQLITE_ENV)
    if isinstance(e, (TypeError, KeyError)):
        return deliberate(e)
    return isinstance(e, USER_ERRORS)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signalprop")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors (also "
              "$SIGNALPROP_DEBUG=1).")
def cli(debug: bool) -> None:
    """signalprop: measure, diagnose and cure vanishing and exploding gradients."""
    if debug:
        _STATE["debug"] = True


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
    from signalprop.errors import debug_requested, print_debug  # lazy: torch (see signalprop.cli)

    _STATE["debug"] = debug_requested()
    try:
        rv = cli.main(args=argv, prog_name="signalprop", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare 'signalprop': the help, as asked
            click.echo(e.format_message(), err=True)
            return int(e.exit_code)
        # one line, like every other error (click's default adds a usage block)
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see '{e.ctx.command_path} -h')"
        print(f"signalprop: error: {e.format_message()}{hint}", file=sys.stderr)
        return int(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("signalprop: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug of ours: the traceback is the useful output
        if _STATE["debug"]:
            print_debug(e)
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(msg.split()) if msg else type(e).__name__  # one line
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
            msg = f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
            msg = f"cannot write or read a file: {msg}"
        print(f"signalprop: error: {msg}", file=sys.stderr)
        return 2
    finally:
        _STATE["debug"] = False
    return int(rv) if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
