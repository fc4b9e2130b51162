"""`dcaccel generate` on the tiny embedded architecture: outputs, printed measurements, bad input."""

import re

import numpy as np
from PIL import Image

from dcaccel.cli import main


def test_generate_with_baseline(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--model", "tiny", "--steps", "9", "--output", str(out),
                 "--baseline"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text
    assert "3 full + 6 shallow U-Net evaluations" in text
    assert "baseline (plain pipeline, eager): 9 U-Net evaluations" in text
    speedup = float(re.search(r"speedup: U-Net loop ([0-9.]+)x", text).group(1))
    assert speedup > 0
    psnr = float(re.search(r"PSNR ([0-9.]+|inf) dB", text).group(1))
    assert np.isfinite(psnr)  # interval 3 changes the image
    image, baseline = Image.open(out), Image.open(tmp_path / "img-baseline.png")
    assert image.size == baseline.size == (32, 32)


def test_generate_interval_one_equals_baseline(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--steps", "4", "--interval", "1", "--output",
                 str(tmp_path / "a.png"), "--baseline"]) == 0
    assert "PSNR inf dB, max |diff| 0 of 255" in capsys.readouterr().out


def test_generate_img2img_and_inpaint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(((rng.random((32, 32)) > 0.5) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert main(["generate", "--model", "tiny", "--steps", "6", "--image", str(tmp_path / "in.png"),
                 "--strength", "0.5", "--output", str(tmp_path / "i2i.png")]) == 0
    assert "(img2img)" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny", "--steps", "6", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--output", str(tmp_path / "inp.png")]) == 0
    assert "(inpaint)" in capsys.readouterr().out
    assert (tmp_path / "i2i.png").is_file() and (tmp_path / "inp.png").is_file()


def test_generate_bad_input(tmp_path, capsys):
    base = ["generate", "--model", "tiny", "--steps", "3", "--output", str(tmp_path / "x.png")]
    assert main(base + ["--branch", "12"]) == 2
    assert "branch must be in 0..11" in capsys.readouterr().err
    assert main(base + ["--interval", "0"]) == 2
    assert "interval" in capsys.readouterr().err
    assert main(base + ["--mask", "m.png"]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere")]) == 2
    assert "neither a local pipeline directory nor an embedded model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_loads_a_saved_pipeline_directory(tmp_path, capsys):
    from dcaccel.models import build_pipeline

    build_pipeline("tiny").save_pretrained(tmp_path / "pipe")
    assert main(["generate", "--model", str(tmp_path / "pipe"), "--steps", "3", "--output",
                 str(tmp_path / "y.png")]) == 0
    assert f"local pipeline {tmp_path / 'pipe'}" in capsys.readouterr().out
