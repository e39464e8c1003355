"""The one command runner: every command (train.py, predict.py, export.py, ensemble.py, plot.py,
coco_eval.py, datasets/convert_nuclei.py) runs its work inside `one_line_errors`, which turns the
typed errors of errors.py into `<command>: error: <message>` on stderr and exit status
EXIT_STATUS, and defines the flags they share once. Imports only the standard library and
errors.py, so light commands stay light.
"""

import contextlib
import sys
import traceback

from errors import CommandError, TrainingStopped

# argparse's status for bad usage: a bad flag and a bad file are the user's to fix alike.
EXIT_STATUS = 2


@contextlib.contextmanager
def one_line_errors(command, debug=False):
    """Turns a CommandError raised inside into `<command>: error: <message>` on stderr (after its
    traceback with `debug`) and exit status EXIT_STATUS; TrainingStopped exits with its own
    status."""
    try:
        yield
    except CommandError as e:
        if debug:
            traceback.print_exception(e)
        print(f"{command}: error: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None
    except TrainingStopped as e:
        raise SystemExit(e.exit_code) from None


def add_device_arg(parser):
    """--device, with the rule every command follows (utils.device_or_default)."""
    parser.add_argument("--device", help="cuda when available, else cpu")


def add_debug_arg(parser):
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback behind an error message"
    )
