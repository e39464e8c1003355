"""Recipe files: the flags of a run as TOML, read with --config and written into each run's folder.

    python train.py --config configs/demo.toml
    python train.py --config configs/demo.toml --epochs 2 --output-dir output/short

A recipe file holds one `key = value` line per flag. A key is the flag's long name without its
dashes (`batch-size`, `weight-decay`, `wd`) or its argparse destination (`batch_size`,
`weight_decay`); values are TOML strings, integers, floats (an integer is accepted where a float
is expected), `true`/`false` for switches such as `amp`, and lists for flags that take several
values (`lr-steps = [16, 22]`). A flag left out keeps its default, and a flag given on the command
line wins over the file. An unknown key, a value of the wrong type or outside the flag's choices,
and a missing or unparsable file are a ConfigError naming the file and the key.

write_config writes a run's effective flags, so that `--config <output-dir>/config.toml` repeats
the run. This module also says what in a recipe makes a loss go non-finite (non_finite_advice).
"""

import argparse
import difflib
import sys
import tomllib

from errors import ConfigError

# Flags that describe one process or one invocation rather than the run, left out of config.toml:
# which checkpoint to continue from, evaluation-only, error tracebacks, the device (set to what
# this machine has) and the launcher's rank bookkeeping.
NOT_RECORDED = frozenset(
    ("config", "resume", "test_only", "debug", "device", "world_size", "local_rank")
)
# torchvision's reference recipe: lr 0.02 for SGD with 16 images per step (8 GPUs x 2).
REFERENCE_LR, REFERENCE_BATCH = 0.02, 16
ADAMW_LR_RANGE = (1e-4, 1e-3)
FLOAT16_MAX = 65504.0

_TYPE_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def add_config_arg(parser):
    """Adds --config to `parser` (or an argument group of it)."""
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read flags from a TOML recipe (keys are flag names); command-line flags win",
    )


def parse_args(parser, argv=None):
    """`parser.parse_args(argv)` with the values of the --config file (if any) as defaults.

    The parser's defaults are changed in place. Raises ConfigError for a bad recipe file.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    path = _config_path(parser, argv)
    if path is not None:
        parser.set_defaults(**read_config(path, parser))
    return parser.parse_args(argv)


def _config_path(parser, argv):
    finder = argparse.ArgumentParser(
        prog=parser.prog, add_help=False, allow_abbrev=parser.allow_abbrev
    )
    finder.add_argument("--config")
    return finder.parse_known_args(argv)[0].config


def read_config(path, parser):
    """{dest: value} from the recipe file at `path`, checked against `parser`'s flags."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    actions = _actions_by_key(parser)
    values, keys_of = {}, {}
    for key, value in table.items():
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"--config {path}: {_unknown_key(key, value, actions)}")
        if action.dest in keys_of:
            raise ConfigError(
                f"--config {path}: keys '{keys_of[action.dest]}' and '{key}' set the same flag"
            )
        keys_of[action.dest] = key
        try:
            values[action.dest] = _convert(action, value)
        except ValueError as e:
            raise ConfigError(f"--config {path}: key '{key}' {e}") from None
    return values


def _flag_actions(parser):
    """The parser's option flags that a recipe may set, in the order of the parser."""
    return [
        action
        for action in parser._actions
        if action.option_strings
        and action.dest not in ("config", argparse.SUPPRESS)
        and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    ]


def _actions_by_key(parser):
    actions = {}
    for action in _flag_actions(parser):
        actions[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:]] = action
    return actions


def _unknown_key(key, value, actions):
    if isinstance(value, dict):
        return f"unknown key '{key}' (a [table]: recipe files hold flags only, without sections)"
    close = difflib.get_close_matches(key, actions, n=1)
    return f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def _convert(action, value):
    """The flag's value for a TOML value, as the command line would give it; ValueError says
    what the key must be."""
    if action.nargs == 0:  # a switch (store_true and the like): true means "flag given"
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_describe(value)}")
        return action.const if value else action.default
    expected = _expected(action)
    if action.nargs is None or action.nargs == "?":
        return _convert_one(action, value, expected)
    count = action.nargs if isinstance(action.nargs, int) else None
    if (
        not isinstance(value, list)
        or (count is not None and len(value) != count)
        or (action.nargs == "+" and not value)
    ):
        raise ValueError(f"must be {expected}, got {_describe(value)}")
    try:
        return [_convert_one(action, item, expected) for item in value]
    except ValueError:
        raise ValueError(f"must be {expected}, got {_describe(value)}") from None


def _expected(action):
    """What the key must be, e.g. "an integer", "a non-empty list of integers", "one of ..."."""
    kind = action.type or str
    if action.choices is not None:
        choices = ", ".join(_describe(choice) for choice in action.choices)
        one, many = f"one of {choices}", f"values from {choices}"
    else:
        name = getattr(kind, "__name__", "value")
        one, many = _TYPE_NAMES.get(kind, (f"a valid {name}", f"valid {name} values"))
    if action.nargs is None or action.nargs == "?":
        return one
    if isinstance(action.nargs, int):
        return f"a list of {action.nargs} {many}"
    return f"a {'non-empty ' if action.nargs == '+' else ''}list of {many}"


def _convert_one(action, value, expected):
    kind = action.type or str
    if kind in (int, float, str):
        allowed = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(f"must be {expected}, got {_describe(value)}")
        converted = kind(value)
    else:
        # Any other argparse type takes the text the command line would pass.
        if isinstance(value, bool | dict | list):
            raise ValueError(f"must be {expected}, got {_describe(value)}")
        try:
            converted = kind(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"must be {expected}, got {_describe(value)} ({e})") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"must be {expected}, got {_describe(value)}")
    return converted


def _describe(value):
    if isinstance(value, dict):
        return "a table"
    try:
        return toml_value(value)
    except TypeError:
        return str(value)


def config_text(args, parser):
    """The run's flags as a recipe file, grouped as in `parser`; None values and NOT_RECORDED
    flags are left out (TOML has no null, and a left-out flag takes its default, None)."""
    lines = ["# The flags of this run: python train.py --config <this file> repeats it."]
    recordable = set(_flag_actions(parser))
    for group in parser._action_groups:
        group_lines = [
            _config_line(action, getattr(args, action.dest))
            for action in group._group_actions
            if action in recordable
            and action.dest not in NOT_RECORDED
            and getattr(args, action.dest, None) is not None
        ]
        if group_lines:
            lines += ["", f"# {group.title}", *group_lines]
    return "\n".join(lines) + "\n"


def _config_line(action, value):
    if action.nargs == 0:
        value = value == action.const
    return f"{_key_name(action)} = {toml_value(value)}"


def _key_name(action):
    """The kebab-case long flag name: what the user types, without the dashes."""
    long_names = [option[2:] for option in action.option_strings if option.startswith("--")]
    kebab = action.dest.replace("_", "-")
    if kebab in long_names:
        return kebab
    return long_names[0] if long_names else action.dest


def write_config(args, path, parser):
    """Writes config_text(args, parser) to `path` (main process only: the caller's job)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_text(args, parser))


def toml_value(value):
    """`value` (str, int, float, bool or a list of them) as a TOML value; TypeError otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is the shortest text that reads back as the same float; TOML accepts its forms
        # (1e-06, 1e+16, inf, -inf, nan).
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_escape(char) for char in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _escape(char):
    if char in '"\\':
        return "\\" + char
    if char < " " or char == "\x7f":  # control characters must be escaped in TOML strings
        return f"\\u{ord(char):04x}"
    return char


def non_finite_advice(args, world_size):
    """Likely causes of a non-finite loss that apply to this run's flags, one sentence each.

    `args.device` is the device the run uses (train.setup sets it); `world_size` is the number of
    processes, which with --batch-size gives the total batch.
    """
    advice = []
    total_batch = args.batch_size * world_size
    if args.opt == "sgd":
        scaled = REFERENCE_LR * total_batch / REFERENCE_BATCH
        if args.lr > scaled * (1 + 1e-9):
            advice.append(
                f"--lr {args.lr:g} is {args.lr / scaled:.3g}x the linear scaling rule's {scaled:g} "
                f"for SGD with a total batch of {total_batch} ({world_size} process(es) x "
                f"--batch-size {args.batch_size}; {REFERENCE_LR:g} x {total_batch} / "
                f"{REFERENCE_BATCH}): try --lr {scaled:g}"
            )
    elif args.opt == "adamw" and args.lr > ADAMW_LR_RANGE[1]:
        low, high = ADAMW_LR_RANGE
        advice.append(f"--lr {args.lr:g} is above AdamW's usual range, {low:g} to {high:g}")
    # A pretrained backbone alone is enough for torchvision's recipe to train without clipping.
    if args.clip_grad_norm is None and not args.weights and not args.weights_backbone:
        advice.append(
            "no --clip-grad-norm while training from scratch (neither --weights nor "
            "--weights-backbone): try --clip-grad-norm 10"
        )
    if args.amp and str(args.device or "").startswith("cuda"):
        advice.append(
            f"--amp computes in float16 on CUDA, which overflows above {FLOAT16_MAX:g}: "
            "try without --amp, or with a lower --lr"
        )
    return advice
