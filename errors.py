"""The errors a command reports as one line: bad configuration, bad data, bad checkpoint; and
TrainingStopped, the end of a run that a signal stopped after its checkpoint.

Library code raises them with a message that names the file, flag or item and what is wrong;
every command turns them into that line and its exit status in one place
(commands.one_line_errors). Imports only the standard library, so light commands stay light.
"""

# What a DataLoader worker's exception becomes in the main process: torch re-raises it as the
# same class, built from the worker's formatted traceback, whose last line is "<class>: message".
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class CommandError(Exception):
    """A problem the user can fix; `message` is the one line to print."""

    def __init__(self, message):
        super().__init__(message)
        self.message = _own_message(str(message), type(self).__name__)

    def __str__(self):
        return self.message


class ConfigError(CommandError):
    """Impossible flags or recipe values: a flag, a key or their combination."""


class DataError(CommandError):
    """A problem in the data: an annotation file, an image, an item of either."""


class CheckpointError(CommandError):
    """A file that is not a checkpoint (or weights) this repo can use."""


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a checkpoint; the process exits `exit_code`."""

    def __init__(self, exit_code):
        super().__init__(f"stopped by a signal; exit code {exit_code}")
        self.exit_code = exit_code


def first_line(error):
    """The first line of an exception's message (its class name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _own_message(text, class_name):
    """The message itself, also when a DataLoader worker's re-raise wrapped it in a traceback."""
    if _WORKER_TRACEBACK not in text:
        return text
    last_line = text.strip().splitlines()[-1]
    return last_line.split(f"{class_name}: ", 1)[-1]
