"""progress: a tqdm bar on terminals, plain lines without carriage returns elsewhere."""

import io

import pytest

from progress import progress, progress_line


def plain(items, **options):
    out = io.StringIO()
    taken = list(progress(items, file=out, terminal=False, **options))
    return taken, out.getvalue()


def test_plain_mode_writes_one_line_per_step_without_carriage_returns():
    taken, text = plain(range(5), desc="predict", unit="image", every=1)
    assert taken == list(range(5))
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        f"predict {k}/5 ({100 * k // 5}%)" for k in range(1, 6)
    ]
    assert all("image/s" in line and "ETA" in line for line in lines)


def test_plain_mode_reports_every_n_steps_and_the_last():
    _, text = plain(range(5), every=2)
    assert [line.split(" | ")[0] for line in text.splitlines()] == [
        "2/5 (40%)",
        "4/5 (80%)",
        "5/5 (100%)",
    ]


def test_plain_mode_without_a_length_reports_counts_and_the_end():
    _, text = plain((k for k in range(5)), desc="convert", every=2)
    lines = text.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["convert 2", "convert 4", "convert 5"]
    assert not any("ETA" in line or "%" in line for line in lines)


def test_plain_mode_defaults_to_about_twenty_lines():
    _, text = plain(range(1000))
    assert len(text.splitlines()) == 20


def test_a_step_is_reported_once_its_item_was_processed():
    out = io.StringIO()
    items = progress(["a", "b", "c"], file=out, terminal=False, every=1)
    assert next(items) == "a"
    assert out.getvalue() == ""
    assert next(items) == "b"
    assert out.getvalue().startswith("1/3 (33%)")


def test_stopping_early_reports_no_false_end():
    out = io.StringIO()
    for item in progress(range(10), file=out, terminal=False, every=5):
        if item == 2:
            break
    assert out.getvalue() == ""


def test_terminal_mode_draws_a_tqdm_bar():
    out = io.StringIO()
    assert list(progress(range(3), desc="demo", unit="image", file=out, terminal=True)) == [0, 1, 2]
    text = out.getvalue()
    assert "\r" in text and "demo" in text and "3/3" in text and "image/s" in text


def test_a_file_is_not_a_terminal():
    out = io.StringIO()
    list(progress(range(3), file=out, every=1))
    assert "\r" not in out.getvalue() and len(out.getvalue().splitlines()) == 3


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("predict", "image", 40, 200, 13.0),
            "predict 40/200 (20%) | 3.08 image/s | elapsed 0:00:13 | ETA 0:00:52",
        ),
        (("", "it", 7, None, 3700.0), "7 | 0.00189 it/s | elapsed 1:01:40"),
        (("x", "it", 0, 10, 0.0), "x 0/10 (0%) | elapsed 0:00:00"),
    ],
)
def test_progress_line(args, line):
    assert progress_line(*args) == line
