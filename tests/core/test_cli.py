"""Every CLI: one flag style (underscores, hyphen spellings as aliases), no abbreviations, did-you-mean."""
from __future__ import annotations

import importlib

import pytest

from core.cli import ArgumentParser

# (module with main(argv), a misspelt or abbreviated flag, the flag it should suggest)
CLIS = [
    ("training.train_unified", "--batchsize", "--batch_size"),
    ("training.train_unified", "--lr_sched", None),  # no prefix matching: --lr must not swallow it either
    ("evaluation.evaluate", "--max_image", "--max_images"),
    ("evaluation.crosseval", "--dataset", "--datasets"),
    ("evaluation.video_scoring", "--batch-siz", "--batch_size"),
    ("preprocessing.extract_faces", "--every", "--every_k"),
    ("experiments.sweep", "--n_trial", "--n_trials"),
    ("serving.ensemble", "--metrics", "--metric"),
    ("serving.promote", "--forse", "--force"),
    ("serving.predict", "--batch_sise", "--batch_size"),
    ("dataio.demo_data", "--n_per", "--n_per_class"),
]


@pytest.mark.parametrize("module,flag,hint", CLIS)
def test_unknown_or_abbreviated_flag_exits_2_naming_the_closest(module: str, flag: str, hint: str | None,
                                                                capsys: pytest.CaptureFixture) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([flag, "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown flag" in err or "unrecognized" in err or "required" in err, err
    if hint and "unknown flag" in err:
        assert f"did you mean {hint}?" in err, err


def test_flags_take_both_spellings_and_no_prefixes(capsys: pytest.CaptureFixture) -> None:
    from training.train_unified import build_parser

    p = build_parser()
    assert p.parse_args(["--batch-size", "8", "--num_workers", "0"]).batch_size == 8
    assert p.parse_args(["--batch_size=9"]).batch_size == 9
    with pytest.raises(SystemExit):
        p.parse_args(["--batch", "8"])  # argparse would expand the prefix
    assert "did you mean --batch_size?" in capsys.readouterr().err
    help_text = p.format_help()
    assert "--batch_size" in help_text and "--batch-size" not in help_text  # one style shown


def test_seed_guide_hyphen_flags_still_work() -> None:
    p = ArgumentParser(prog="x")
    p.add_argument("--test-pairs")
    p.add_argument("--output-dir", default="results")
    a = p.parse_args(["--test-pairs", "pairs.csv", "--output_dir", "out"])
    assert (a.test_pairs, a.output_dir) == ("pairs.csv", "out")
    assert "--test_pairs" in p.format_help()
