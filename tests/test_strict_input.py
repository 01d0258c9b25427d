"""Strict input: a bad file or flag ends in one ``error:`` line and exit code 2, nothing written.

Covers ``wasearch.fileio`` (strict YAML: duplicate keys, binary and non-UTF-8 files, absurd
nesting), finite numbers in flags and files (``--mult inf``, ``width: .nan``), and train.py's
classic flags that would otherwise be silently ignored (``--arch`` with ``--mult``, ``--bits``
without ``--Q``, ``--F`` without ``--static``/``--flex``). The command lines run in-process
through ``run_main``, exactly the path ``search.py`` / ``train.py`` / ``adapt.py`` take.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from wasearch import train_cli
from wasearch.cli import run_main
from wasearch.search.testing import tiny_space

ROOT = Path(__file__).resolve().parents[1]
ARCH = "width: 0.125\ndefault: {conv: normal, bits: 8}\n"  # a valid, narrow architecture
TINY_DATA = [
    "--dataset", "synthetic", "--limit-train", "32", "--limit-test", "32", "--val-fraction", "0",
    "--batch_size", "32", "--epochs", "1", "--use_cpu", "--no-progress",
]  # fmt: skip


@functools.cache
def _search_main():
    spec = importlib.util.spec_from_file_location("search_script", ROOT / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _space(**change) -> str:
    return yaml.safe_dump(tiny_space(**change), sort_keys=False)


# name -> file contents (bytes or text), written into an input folder apart from the cwd.
INPUTS: dict[str, bytes | str] = {
    "bad.yaml": b"\xff\xfe",  # UTF-16 byte-order mark: not UTF-8
    "bad.csv": b"\xff\xfeop,in_channels\n",
    "nul.yaml": b"name: x\x00\x01",
    "nul.csv": b"\x00\x01\x02",
    "deep.yaml": "[" * 10_000,
    "deep_ok_for_yaml.yaml": "a: " + "[" * 200 + "]" * 200 + "\n",  # parses; too deep for us
    "dup.yaml": "name: one\nseed: 0\nname: two\n",
    "dup_nested.yaml": _space().replace("  width: 0.125\n", "  width: 0.125\n  width: 0.25\n"),
    "space_inf.yaml": _space(model={"width": float("inf")}),
    "space_nan.yaml": _space(model={"width": float("nan")}),
    "space_lr_inf.yaml": _space(trial={"lr": float("inf")}),
    "arch_dup.yaml": ARCH + "width: 0.25\n",
    "arch_inf.yaml": "width: .inf\n",
    "arch_nan.yaml": "width: .nan\n",
    "arch.yaml": ARCH,
    "best.pt": b"",  # adapt.py --modelDir needs the file to exist before it reads the others
}


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The input files in tmp_path/in; the cwd is the empty tmp_path/cwd."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, content in INPUTS.items():
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return folder


def _run(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = run_main(main, argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.err


def _assert_one_error_line(rc: int, err: str, needles: tuple[str, ...], cwd: Path) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    last = lines[-1]
    if last.startswith("error: "):  # ours: exactly one line
        assert len(lines) == 1, err
    else:  # argparse's: usage, then one "prog: error: argument --flag: ..." line
        assert ": error: argument " in last, err
    for needle in needles:
        assert needle in last, (needle, last)
    assert not list(cwd.iterdir()), "nothing may be written"


SEARCH_CASES = [
    # (sub-command and input file, words the error line must hold)
    (["run", "bad.yaml"], ("bad.yaml", "not UTF-8")),
    (["run", "nul.yaml"], ("nul.yaml", "binary")),
    (["run", "deep.yaml"], ("deep.yaml", "nested deeper")),
    (["run", "deep_ok_for_yaml.yaml"], ("deep_ok_for_yaml.yaml", "nested deeper")),
    (["run", "dup.yaml"], ("dup.yaml", "line 3", "duplicate key 'name'", "line 1")),
    (["run", "dup_nested.yaml"], ("dup_nested.yaml", "duplicate key 'width'")),
    (["run", "space_inf.yaml"], ("space_inf.yaml", "model.width", "inf")),
    (["run", "space_nan.yaml"], ("space_nan.yaml", "model.width", "nan")),
    (["run", "space_lr_inf.yaml"], ("space_lr_inf.yaml", "trial.lr", "inf")),
    (["pretrain", "dup.yaml"], ("dup.yaml", "duplicate key 'name'")),
    (["measure", "bad.yaml"], ("bad.yaml", "not UTF-8")),
    (["measure", "deep.yaml"], ("deep.yaml", "nested deeper")),
    (["measure", "dup.yaml"], ("dup.yaml", "duplicate key 'name'")),
    (["measure", "space_inf.yaml"], ("space_inf.yaml", "width")),
    (["measure", "space_nan.yaml"], ("space_nan.yaml", "width")),
    (["calibrate", "bad.csv", "--out", "p.yaml"], ("bad.csv", "not UTF-8")),
    (["calibrate", "nul.csv", "--out", "p.yaml"], ("nul.csv", "binary")),
    (["calibrate", "bad.yaml", "--out", "p.yaml"], ("bad.yaml", "not UTF-8")),
]


@pytest.mark.parametrize("argv, needles", SEARCH_CASES, ids=lambda v: " ".join(v)[:40])
def test_search_py_bad_file_is_one_line(argv, needles, inputs, capsys):
    argv = [argv[0], str(inputs / argv[1]), *argv[2:]]
    rc, err = _run(_search_main(), argv, capsys)
    _assert_one_error_line(rc, err, needles, Path.cwd())


TRAIN_CASES = [
    # files
    (["--arch", "@bad.yaml"], ("bad.yaml", "not UTF-8")),
    (["--arch", "@nul.yaml"], ("nul.yaml", "binary")),
    (["--arch", "@deep.yaml"], ("deep.yaml", "nested deeper")),
    (["--arch", "@arch_dup.yaml"], ("arch_dup.yaml", "line 3", "duplicate key 'width'")),
    (["--arch", "@arch_inf.yaml"], ("arch_inf.yaml", "width", "inf")),
    (["--arch", "@arch_nan.yaml"], ("arch_nan.yaml", "width", "nan")),
    (["--latency-model", "@bad.yaml"], ("--latency-model", "bad.yaml", "not UTF-8")),
    (["--latency-model", "@dup.yaml"], ("--latency-model", "duplicate key 'name'")),
    # numbers: argparse's one line, naming the flag
    (["--mult", "inf"], ("--mult", "finite")),
    (["--mult", "nan"], ("--mult", "finite")),
    (["--mult", "1e999"], ("--mult", "finite")),
    (["--lr", "inf"], ("--lr", "finite")),
    (["--weight-decay", "nan"], ("--weight-decay", "finite")),
    (["--weight-decay", "-1"], ("--weight-decay", ">= 0")),
    # flags that would be ignored
    (["--arch", "@arch.yaml", "--mult", "0.5"], ("--mult conflicts with --arch", "width")),
    (["--arch", "@arch.yaml", "--Q"], ("--Q conflicts with --arch",)),
    (["--arch", "@arch.yaml", "--bits", "4"], ("--bits conflicts with --arch",)),
    (["--arch", "@arch.yaml", "--F", "2"], ("--F conflicts with --arch",)),
    (["--arch", "@arch.yaml", "--granularity", "tap"], ("--granularity conflicts with --arch",)),
    (["--bits", "4"], ("--bits 4 needs --Q",)),
    (["--use_normal_conv", "--bits", "4"], ("--bits 4 needs --Q",)),
    (["--static", "--bits", "4"], ("--bits 4 needs --Q",)),
    (["--F", "2"], ("--F 2 needs --static or --flex",)),
    (["--use_normal_conv", "--Q", "--F", "6"], ("--F 6 needs --static or --flex",)),
    (["--static", "--granularity", "tap"], ("--granularity tap needs", "--Q")),
    (["--Q", "--granularity", "tap"], ("--granularity tap needs", "--static or --flex")),
]


@pytest.mark.parametrize("argv, needles", TRAIN_CASES, ids=lambda v: " ".join(v)[:40])
@pytest.mark.parametrize("script", ["train.py", "adapt.py"])
def test_train_and_adapt_bad_input_is_one_line(script, argv, needles, inputs, capsys):
    argv = [str(inputs / a[1:]) if a.startswith("@") else a for a in argv]
    main = train_cli.main
    if script == "adapt.py":  # the same parser; --modelDir first, as adapt.py requires it
        main = functools.partial(train_cli.main, prog="adapt.py", adapt=True)
        argv = ["--modelDir", str(inputs), *argv]
    rc, err = _run(main, [*argv, *TINY_DATA], capsys)
    _assert_one_error_line(rc, err, needles, Path.cwd())


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "argv, used, unused",
    [
        ([], {"mult": 0.5, "Q": False}, ("F", "bits", "granularity")),
        (["--Q"], {"mult": 0.5, "Q": True, "bits": 8}, ("F", "granularity")),
        (
            ["--static", "--mult", "0.125"],
            {"mult": 0.125, "F": 4},
            ("bits", "granularity", "transforms", "wd_bits"),
        ),
        (
            ["--flex", "--F", "2", "--Q", "--bits", "6", "--granularity", "tensor"],
            {"mult": 0.5, "Q": True, "F": 2, "bits": 6, "granularity": "tensor"},
            ("wd_bits",),
        ),
        (  # the quantized Winograd defaults: per-tap ranges and transform scales
            ["--static", "--Q"],
            {"mult": 0.5, "Q": True, "F": 4, "bits": 8, "granularity": "tap", "transforms": "tap"},
            ("wd_bits",),
        ),
        (["--arch", "@arch.yaml"], {}, ("mult", "Q", "bits", "F", "granularity")),
    ],
)
def test_config_json_records_only_the_flags_used(argv, used, unused, inputs, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise _Stop  # config.json is written before training starts

    monkeypatch.setattr(train_cli, "fit", stop)
    argv = [str(inputs / a[1:]) if a.startswith("@") else a for a in argv]
    with pytest.raises(_Stop):
        train_cli.main([*argv, *TINY_DATA, "--run-name", "r"])
    capsys.readouterr()
    flags = json.loads((Path("runs") / "r" / "config.json").read_text())["flags"]
    assert {k: flags.get(k) for k in used} == used
    assert not [k for k in unused if k in flags], flags


def test_bits_and_f_defaults_are_documented_in_help():
    text = train_cli.build_parser().format_help()
    for words in ("needs --Q", "needs --static or --flex", "errors with it"):
        assert words in " ".join(text.split()), words


# -- wasearch.fileio on its own ----------------------------------------------------------------
def test_parse_yaml_refuses_duplicate_keys_naming_key_and_lines():
    from wasearch.fileio import InputFileError, parse_yaml

    with pytest.raises(InputFileError, match=r"^f\.yaml: line 4: duplicate key 'b' \(first on "):
        parse_yaml("a:\n  b: 1\n  c: 2\n  b: 3\n", source="f.yaml")
    with pytest.raises(InputFileError, match="duplicate key 'x'"):
        parse_yaml("{x: 1, y: 2, x: 3}", source="f.yaml")
    with pytest.raises(InputFileError, match="duplicate key"):
        parse_yaml("{1: a, 1: b}", source="f.yaml")


def test_parse_yaml_keeps_what_yaml_allows():
    from wasearch.fileio import parse_yaml

    # A merge key (<<) and a key overriding what it merged are not duplicates.
    data = parse_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", source="f.yaml")
    assert data["c"] == {"x": 3, "y": 2}
    assert parse_yaml("[" * 20 + "]" * 20, source="f.yaml") is not None
    assert parse_yaml("a: .inf", source="f.yaml") == {"a": float("inf")}  # profiles use .inf


@pytest.mark.parametrize(
    "text, words",
    [
        ("[" * 10_000, "nested deeper"),
        ("- " * 70 + "1", "nested deeper"),
        ("a: &a [*a]", "contains itself"),
        ("a: [\n", "not valid YAML at line 2"),
        ("a: !!python/object/apply:os.system [echo]", "not valid YAML"),
        ("a: \x07", "not valid YAML"),
    ],
)
def test_parse_yaml_errors_are_one_line_naming_the_source(text, words):
    from wasearch.fileio import InputFileError, parse_yaml

    with pytest.raises(InputFileError) as info:
        parse_yaml(text, source="some/f.yaml")
    message = str(info.value)
    assert message.startswith("some/f.yaml: ") and words in message
    assert "\n" not in message


def test_read_text_refuses_binary_and_non_utf8(tmp_path):
    from wasearch.cli import UserError
    from wasearch.fileio import InputFileError, read_text

    path = tmp_path / "f.yaml"
    path.write_bytes(b"\xef\xbb\xbfa: 1\n")  # a UTF-8 byte-order mark is dropped
    assert read_text(path) == "a: 1\n"
    path.write_bytes(b"a: \xe9\n")  # Latin-1
    with pytest.raises(InputFileError, match=r"f\.yaml: not UTF-8 text \(byte 0xe9 at offset 3"):
        read_text(path, what="space file")
    path.write_bytes(b"a\x00b")
    with pytest.raises(InputFileError, match=r"f\.yaml: binary data .* space file"):
        read_text(path, what="space file")
    with pytest.raises(InputFileError, match="missing.yaml: cannot read space file"):
        read_text(tmp_path / "missing.yaml", what="space file")
    assert issubclass(InputFileError, UserError) and issubclass(InputFileError, ValueError)
