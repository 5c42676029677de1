"""`diffpath features`: other checkpoint settings run; bad input fails in one line, writes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffpath.cli import main
from diffpath.models.improved_unet import build_from_settings
from diffpath.core.schedule import space_timesteps

SMALL = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "num_heads": 1,
    "attention_resolutions": "8", "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "rescale_timesteps": True, "in_channels": 1,
}


def _save_improved(tmp_path, settings, name="m"):
    torch.manual_seed(0)
    net = build_from_settings(settings)
    pt = tmp_path / f"{name}.pt"
    torch.save(net.state_dict(), pt)
    (tmp_path / f"{name}.json").write_text(json.dumps(settings))
    return pt


def _run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("steps", [3, 5])
def test_other_settings_run_through_cli(tmp_path, capsys, steps):
    pt = _save_improved(tmp_path, SMALL)
    imgs = tmp_path / "imgs.npz"
    np.savez(imgs, images=np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    out = tmp_path / "out.npz"
    code, err = _run(capsys, "features", "--model", str(pt), "--images", str(imgs), "--steps", str(steps),
                     "--out", str(out), "--device", "cpu", "--no-progress")
    assert code == 0, err
    with np.load(out) as z:
        assert z["features_6d"].shape == (3, 6)
        assert z["curvature_1d"].shape == (3,)
        assert list(z["timesteps"]) == space_timesteps(1000, steps)
        assert np.all(np.isfinite(z["features_6d"]))


@pytest.fixture
def tiny(tmp_path):
    pt = _save_improved(tmp_path, SMALL)
    good = tmp_path / "good.npz"
    np.savez(good, x0=np.zeros((2, 1, 32, 32), np.float32))
    return pt, good


def _fails(capsys, tmp_path, args, match):
    out = tmp_path / "out.npz"
    code, err = _run(capsys, "features", *args, "--out", str(out), "--device", "cpu", "--no-progress")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("diffpath: error")]
    assert len(lines) == 1 and match in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.npz")]  # no temp files


def test_bad_images(tmp_path, capsys, tiny):
    pt, _ = tiny
    cases = {
        "wrong shape": (dict(x0=np.zeros((2, 3, 32, 32), np.float32)), "shape"),
        "wrong range": (dict(x0=np.full((2, 1, 32, 32), 3.0, np.float32)), "[-1, 1]"),
        "nan": (dict(x0=np.full((2, 1, 32, 32), np.nan, np.float32)), "NaN"),
        "bad uint8 shape": (dict(images=np.zeros((2, 5, 28, 28, 7), np.uint8)), "shape"),
        "float images": (dict(images=np.zeros((2, 28, 28), np.float32)), "uint8"),
        "no array": (dict(foo=np.zeros(3)), "'x0' or 'images'"),
    }
    for name, (arrays, match) in cases.items():
        f = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(f, **arrays)
        _fails(capsys, tmp_path, ["--model", str(pt), "--images", str(f)], match)


def test_missing_files_and_unknown_method(tmp_path, capsys, tiny):
    pt, good = tiny
    _fails(capsys, tmp_path, ["--model", str(pt), "--images", str(tmp_path / "nope.npz")], "no such file")
    _fails(capsys, tmp_path, ["--model", str(tmp_path / "nope.pt"), "--images", str(good)], "no such checkpoint")
    _fails(capsys, tmp_path, ["--model", str(pt), "--images", str(good), "--method", "magic"], "unknown method")


def test_checkpoint_keys_not_fitting_settings(tmp_path, capsys, tiny):
    pt, good = tiny
    bad = dict(SMALL, num_res_blocks=2)  # the checkpoint has 1 res block per level
    shutil.copy(pt, tmp_path / "bad.pt")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _fails(capsys, tmp_path, ["--model", str(tmp_path / "bad.pt"), "--images", str(good)], "input_blocks.")
    # no settings file at all
    shutil.copy(pt, tmp_path / "lonely.pt")
    _fails(capsys, tmp_path, ["--model", str(tmp_path / "lonely.pt"), "--images", str(good)], "settings")


def test_nan_model_output_is_reported(tmp_path, capsys, monkeypatch, tiny):
    pt, good = tiny
    from diffpath import models

    real = models.EpsModel.__call__
    monkeypatch.setattr(models.EpsModel, "__call__", lambda self, x, t: real(self, x, t) * float("nan"))
    _fails(capsys, tmp_path, ["--model", str(pt), "--images", str(good)], "NaN")


# -- the model and run options every command line shares -------------------------------------------

SHARED = ("--model", "--device", "--precision", "--channels-last", "--compile", "--cuda-graphs",
          "--batch-size", "--chunk-size", "--no-progress", "--steps")


def _option_parsers():
    from diffpath.cli import build_parser
    from diffpath.study.distributed import build_parser as distributed_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {**{f"diffpath {k}": v for k, v in sub.items()}, "diffpath.study.distributed": distributed_parser()}


def test_every_command_line_shares_one_definition_of_the_run_options():
    seen: dict[str, dict[str, tuple]] = {}
    for name, parser in _option_parsers().items():
        for action in parser._actions:
            flag = next((s for s in action.option_strings if s in SHARED), None)
            if flag is None or (flag == "--steps" and name == "diffpath localize"):  # its own: steps per walk
                continue
            what = (action.default, tuple(action.choices or ()), action.type)
            seen.setdefault(flag, {})[name] = what
    for flag, by_parser in seen.items():
        assert len(set(by_parser.values())) == 1, (flag, by_parser)
    assert seen["--batch-size"]["diffpath.study.distributed"][0] == 128
    assert seen["--chunk-size"]["diffpath fit"][0] == 1024
    assert "auto" in seen["--precision"]["diffpath fit"][1]
    assert {"diffpath fit", "diffpath score", "diffpath features", "diffpath localize",
            "diffpath.study.distributed"} <= set(seen["--precision"])


def test_precision_auto_is_the_devices_fast_choice():
    from diffpath.cli import build_parser
    from diffpath.cli.options import pass_options
    from diffpath.models import RunOptions

    args = build_parser().parse_args(["fit", "--model", "m", "--normal", "n", "--out", "o",
                                      "--precision", "auto", "--channels-last"])
    run = pass_options(args)
    assert run.network("cpu") == RunOptions(precision="fp32", channels_last=True)
    assert run.network("cuda") == RunOptions(precision="bf16", channels_last=True)


@pytest.mark.parametrize("flag, value, match", [("--steps", "1", "steps must be at least 2"),
                                                ("--batch-size", "0", "batch_size must be a positive"),
                                                ("--precision", "fp8", "invalid choice")])
def test_bad_run_options_fail_alike_in_every_command(tmp_path, capsys, tiny, flag, value, match):
    from diffpath.study.distributed import main as distributed

    pt, good = tiny
    out = tmp_path / "sub" / "o"
    runs = {
        "features": lambda a: main(["features", "--model", str(pt), "--images", str(good), "--out",
                                    f"{out}.npz", *a]),
        "fit": lambda a: main(["fit", "--model", str(pt), "--normal", str(tmp_path), "--out", str(out), *a]),
        "distributed": lambda a: distributed(["--model", str(pt), "--x0", str(good), "--out", f"{out}.npz",
                                              "--device", "cpu", *a]),
    }
    for name, run in runs.items():
        try:
            code = run([flag, value])
        except SystemExit as exc:  # argparse refuses a choice (exit status 2) before any handler
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and match in err, (name, err)
        assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1, (name, err)
        assert not (tmp_path / "sub").exists(), name  # refused before anything was written


def test_help_shows_every_default_and_what_the_outputs_are(capsys):
    from diffpath.cli import main

    for argv in (["localize", "--help"], ["score", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--kind", "deterministic"), ("--t0", "0.4"), ("--steps", "5"), ("--draws", "1"),
                            ("--reduce", "maps"), ("--map", "pixel"), ("--seed", "0"), ("--resize", "auto")):
        after = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in after, (option, after)
    for name in ("NNNN_<name>_map.npy", "NNNN_<name>_overlay.png", "scores.csv", "localize.json",
                 "score = the maximum of the pooled map", "colour images as their luma"):
        assert name in text, name
    for column in ("percentile the percentage of the detector's calibration scores",
                   "is_ood 1 when score < the threshold"):
        assert column in text, column
