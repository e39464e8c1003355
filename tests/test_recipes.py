"""Recipe files against train.py's real parser: reading, precedence, errors, round trips, advice."""

import argparse
import math
import os
import tomllib

import pytest
from conftest import ROOT

import recipes
import train
from errors import ConfigError

DEMO_FLAGS = [
    "--data-path", "datasets/demo", "--output-dir", "output/demo",
    "--model", "maskrcnn_resnet18_fpn", "--fpn-channels", "64", "--epochs", "6", "-b", "2",
    "-j", "1", "--min-size", "320", "--max-size", "320", "--opt", "adamw", "--lr", "0.001",
    "--clip-grad-norm", "10", "--lr-scheduler", "cosineannealinglr", "--warmup-iters", "10",
    "--rpn-post-nms-top-n-train", "300", "--rpn-post-nms-top-n-test", "300",
    "--box-batch-size-per-image", "64", "--box-positive-fraction", "0.5",
    "--box-score-thresh", "0", "--anchor-sizes", "8", "16", "32", "64", "128",
    "--eval-every", "2", "--seed", "0",
]  # fmt: skip


def make_parser():
    parser = train.get_args_parser()
    if not any(action.dest == "config" for action in parser._actions):
        recipes.add_config_arg(parser)
    return parser


def parse(argv):
    return recipes.parse_args(make_parser(), argv)


def recorded(args):
    return {k: v for k, v in vars(args).items() if k not in recipes.NOT_RECORDED}


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_become_the_arguments(tmp_path):
    path = write(tmp_path, 'epochs = 3\nlr-steps = [1, 2]\namp = true\nopt = "adamw"\nlr = 1\n')
    args = parse(["--config", str(path)])
    assert (args.epochs, args.lr_steps, args.amp, args.opt) == (3, [1, 2], True, "adamw")
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.config == str(path)
    assert args.batch_size == make_parser().get_default("batch_size")


def test_config_equals_form(tmp_path):
    args = parse([f"--config={write(tmp_path, 'epochs = 3')}"])
    assert args.epochs == 3


def test_command_line_wins_over_the_file(tmp_path):
    path = write(tmp_path, "epochs = 3\nbatch-size = 7\nlr-steps = [1, 2]\n")
    args = parse(["--epochs", "5", "--config", str(path), "--lr-steps", "4"])
    assert (args.epochs, args.batch_size, args.lr_steps) == (5, 7, [4])


def test_a_switch_given_on_the_command_line_wins_over_false(tmp_path):
    path = write(tmp_path, "amp = false\ndsb-score = true\n")
    args = parse(["--config", str(path), "--amp"])
    assert args.amp and args.dsb_score


@pytest.mark.parametrize(
    "key", ["batch_size", "batch-size", "weight_decay", "weight-decay", "wd", "local_rank"]
)
def test_dest_and_flag_names_are_both_keys(tmp_path, key):
    args = parse(["--config", str(write(tmp_path, f"{key} = 6\n"))])
    dest = {"wd": "weight_decay", "weight-decay": "weight_decay"}.get(key, key.replace("-", "_"))
    assert getattr(args, dest) == 6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr_stepz = [1]", "unknown key 'lr_stepz' (did you mean 'lr_steps'?)"),
        ("[data]\nworkers = 1", "unknown key 'data' (a [table]"),
        ("b = 2", "unknown key 'b'"),
        ("config = 'x.toml'", "unknown key 'config'"),
        ('epochs = "ten"', "key 'epochs' must be an integer, got \"ten\""),
        ("epochs = 2.5", "key 'epochs' must be an integer, got 2.5"),
        ("epochs = true", "key 'epochs' must be an integer, got true"),
        ('lr = "0.1"', "key 'lr' must be a number, got \"0.1\""),
        ("data-path = 3", "key 'data-path' must be a string, got 3"),
        ("amp = 1", "key 'amp' must be true or false, got 1"),
        ('opt = "adam"', 'key \'opt\' must be one of "sgd", "adamw", got "adam"'),
        ("lr-steps = 16", "key 'lr-steps' must be a non-empty list of integers, got 16"),
        ("lr-steps = []", "key 'lr-steps' must be a non-empty list of integers, got []"),
        ('lr-steps = [16, "x"]', "key 'lr-steps' must be a non-empty list of integers"),
        ("epochs = {a = 1}", "key 'epochs' must be an integer, got a table"),
        ("wd = 0.1\nweight-decay = 0.2", "keys 'wd' and 'weight-decay' set the same flag"),
        ("epochs = = 2", "not valid TOML"),
    ],
)
def test_bad_recipes_are_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        parse(["--config", str(path)])
    assert raised.value.message.startswith(f"--config {path}: ")
    assert message in raised.value.message
    assert "\n" not in raised.value.message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"^--config {path}: no such file$"):
        parse(["--config", str(path)])


def test_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"epochs = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse(["--config", str(path)])


def test_no_config_parses_as_the_parser_does():
    argv = ["--epochs", "4", "--amp"]
    assert vars(parse(argv)) == vars(make_parser().parse_args(argv))


def round_trip(args, tmp_path):
    path = tmp_path / "config.toml"
    recipes.write_config(args, path, make_parser())
    return parse(["--config", str(path)])


def test_round_trip_of_defaults(tmp_path):
    args = make_parser().parse_args([])
    assert recorded(round_trip(args, tmp_path)) == recorded(args)


def test_round_trip_of_a_full_run(tmp_path):
    argv = DEMO_FLAGS + [
        "--train-ann", 'odd "quoted" \\path\\ é\tname.json', "--weights", "W.COCO_V1",
        "--wd", "1e-06", "--lr-steps", "3", "5", "--amp", "--force-amp", "--dsb-score",
        "--keep-last", "2",
        "--norm-weight-decay", "0", "--momentum", "0.95", "--lr-gamma", "3e-20",
        "--rpn-score-thresh", "1e16", "--dist-backend", "gloo", "--data-augmentation", "lsj",
        "--use-copypaste", "--resume", "auto", "--test-only", "--device", "cpu", "--debug",
    ]  # fmt: skip
    args = make_parser().parse_args(argv)
    args.seed = 123456789  # train.seed_run fills in a drawn seed before the file is written
    again = round_trip(args, tmp_path)
    assert recorded(again) == recorded(args)
    for dest in recipes.NOT_RECORDED - {"config"}:
        assert getattr(again, dest) == make_parser().get_default(dest)


def test_written_file_leaves_out_process_flags_and_uses_flag_names(tmp_path):
    args = make_parser().parse_args(["--resume", "auto", "--device", "cuda", "-b", "3"])
    text = recipes.config_text(args, make_parser())
    keys = tomllib.loads(text).keys()
    assert "batch-size" in keys and "weight-decay" in keys and "batch_size" not in keys
    assert not keys & {"resume", "device", "test-only", "world-size", "local-rank", "config"}
    assert "min-size" not in keys  # None: left to the default


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'q"uote \\ back',
        "tab\tnew\nline\x00nul\x7fdel\x1f",
        "ünïcödé 😀",
        0.1,
        1e-06,
        1e16,
        -2.5e-300,
        math.inf,
        -math.inf,
        0,
        -7,
        2**62,
        True,
        False,
        [1, 2.5, "x"],
        [],
        [[1], ["a"]],
    ],
)
def test_toml_value_reads_back_equal(value):
    assert tomllib.loads(f"k = {recipes.toml_value(value)}")["k"] == value


def test_toml_value_rejects_what_toml_cannot_hold():
    with pytest.raises(TypeError):
        recipes.toml_value(None)
    with pytest.raises(TypeError):
        recipes.toml_value({"a": 1})


CONFIGS = sorted(os.listdir(os.path.join(ROOT, "configs")))


def test_there_are_recipes():
    assert {"demo.toml", "coco_r50_fpn_26ep.toml", "nuclei_finetune.toml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_recipe_parses_and_says_how_to_run_it(name):
    path = os.path.join(ROOT, "configs", name)
    args = parse(["--config", path])
    train.check_args(args)
    with open(path) as f:
        first_line = f.readline()
    assert first_line.startswith("# ") and f"train.py --config configs/{name}" in first_line


def test_demo_recipe_is_the_readme_command():
    demo = parse(["--config", os.path.join(ROOT, "configs", "demo.toml")])
    command_line = make_parser().parse_args(DEMO_FLAGS)
    assert recorded(demo) == recorded(command_line)


def test_published_recipe_scales_to_the_reference_lr():
    args = parse(["--config", os.path.join(ROOT, "configs", "coco_r50_fpn_26ep.toml")])
    assert (args.epochs, args.lr_steps, args.lr, args.batch_size) == (26, [16, 22], 0.02, 2)
    assert recipes.non_finite_advice(args, world_size=8) == []


def advice_args(**overrides):
    args = argparse.Namespace(
        opt="sgd", lr=0.0025, batch_size=2, clip_grad_norm=10.0, weights=None,
        weights_backbone=None, amp=False, device="cpu",
    )  # fmt: skip
    vars(args).update(overrides)
    return args


def causes(advice):
    return {
        cause
        for cause, marker in [
            ("lr", "linear scaling rule"),
            ("adamw", "AdamW's usual range"),
            ("clip", "--clip-grad-norm"),
            ("amp", "float16"),
        ]
        if any(marker in line for line in advice)
    }


@pytest.mark.parametrize(
    ("overrides", "world_size", "expected"),
    [
        ({}, 1, set()),
        ({"lr": 0.02}, 1, {"lr"}),
        ({"lr": 0.02}, 8, set()),
        ({"lr": 0.02, "batch_size": 1}, 8, {"lr"}),
        ({"lr": 0.021}, 8, {"lr"}),
        ({"opt": "adamw", "lr": 0.02}, 8, {"adamw"}),
        ({"opt": "adamw", "lr": 0.001}, 1, set()),
        ({"opt": "adamw", "lr": 0.0011}, 1, {"adamw"}),
        ({"clip_grad_norm": None}, 1, {"clip"}),
        ({"clip_grad_norm": None, "weights": "W.COCO_V1"}, 1, set()),
        ({"clip_grad_norm": None, "weights_backbone": "ResNet50_Weights.IMAGENET1K_V1"}, 1, set()),
        ({"amp": True, "device": "cuda"}, 1, {"amp"}),
        ({"amp": True, "device": "cuda:1"}, 1, {"amp"}),
        ({"amp": True, "device": "cpu"}, 1, set()),
        ({"amp": False, "device": "cuda"}, 1, set()),
        (
            {"lr": 0.1, "clip_grad_norm": None, "amp": True, "device": "cuda"},
            2,
            {"lr", "clip", "amp"},
        ),
    ],
)
def test_non_finite_advice_names_exactly_the_causes_that_apply(overrides, world_size, expected):
    advice = recipes.non_finite_advice(advice_args(**overrides), world_size)
    assert causes(advice) == expected
    assert len(advice) == len(expected)


def test_lr_advice_gives_the_scaled_value():
    (advice,) = recipes.non_finite_advice(advice_args(lr=0.02, batch_size=4), world_size=2)
    assert "total batch of 8" in advice and "try --lr 0.01" in advice and "2x" in advice
