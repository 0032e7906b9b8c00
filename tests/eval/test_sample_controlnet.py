"""`pipeline sample` of a ControlNet: control maps from pictures, the grid, and clear refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.feature import canny

from pipeline.cli import main
from pipeline.eval import image_grid
from pipeline.train.controlnet_task import control_from_image, sample_controlled
from pipeline.train.export import load_exported
from tests.eval.conftest import EDGES


def _png(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_control_map_is_the_canny_edges_of_the_picture(tmp_path, tiny_store):
    _, meta = load_exported(tiny_store.dirs["tiny-controlnet"])
    pixels = np.zeros((8, 8), np.uint8)
    pixels[2:6, 2:6] = 255  # a white square at the model's own size: no resizing
    edges, picture = control_from_image(_png(tmp_path / "square.png", pixels), meta)
    expected = canny(pixels / 255.0, sigma=EDGES["sigma"], low_threshold=EDGES["low_threshold"],
                     high_threshold=EDGES["high_threshold"])
    assert edges.shape == (1, 1, 8, 8) and expected.any()
    assert torch.equal(edges[0, 0].bool(), torch.from_numpy(expected))
    assert torch.equal(picture[0, 0], torch.from_numpy(pixels / 127.5 - 1.0).float())
    # a large colour photograph is turned grey and resized to the model's 8×8
    edges, picture = control_from_image(_png(tmp_path / "astronaut.png", skdata.astronaut()), meta)
    assert edges.shape == picture.shape == (1, 1, 8, 8) and -1 <= picture.min() <= picture.max() <= 1


def test_sample_command_draws_rows_that_start_with_the_control(tmp_path, tiny_mlflow, capsys):
    pics = [_png(tmp_path / "camera.png", skdata.camera()), _png(tmp_path / "coins.png", skdata.coins())]
    out = tmp_path / "grid.png"
    rc = main(["sample", "models:/tiny-controlnet@champion", "--control", pics[0], "--control", pics[1],
               "--label", "2", "--num", "3", "--steps", "4", "--out", str(out), "--tracking-uri", tiny_mlflow.uri])
    assert rc == 0 and "following the edges of 2 picture(s)" in capsys.readouterr().out
    # Independently: the zero-initialised ControlNet draws what its base draws from the same noise, and each
    # row is [edge map, 3 samples].
    model, meta = load_exported(tiny_mlflow.dirs["tiny-controlnet"])
    base, base_meta = load_exported(tiny_mlflow.dirs["tiny-ddpm"])
    control = torch.cat([control_from_image(p, meta)[0].expand(3, -1, -1, -1) for p in pics])
    samples = sample_controlled(base, base_meta, torch.full((6,), 2), None, steps=4, seed=0)
    rows = [torch.cat([control[i * 3:i * 3 + 1] * 2 - 1, samples[i * 3:(i + 1) * 3]]) for i in range(2)]
    assert out.read_bytes() == image_grid(torch.cat(rows), nrow=4, scale=4)
    assert Image.open(io.BytesIO(out.read_bytes())).size == ((4 * 9 + 1) * 4, (2 * 9 + 1) * 4)


@pytest.mark.parametrize("extra, message", [
    ([], "give --control IMAGE.png"),
    (["--control", "missing.png"], "--control missing.png: not a readable image"),
    (["--control", "{pic}", "--caption", "a three"], "not --caption or --classifier"),
    (["--control", "{pic}", "--label", "10"], r"--label must be in \[0, 9\]"),
    (["--control", "{pic}", "--guidance", "2"], "--guidance guides toward a class: give --label too"),
])
def test_sample_command_refuses_what_a_controlnet_cannot_do(tmp_path, tiny_mlflow, extra, message):
    pic = _png(tmp_path / "camera.png", skdata.camera())
    args = [a.format(pic=pic) for a in extra]
    with pytest.raises(SystemExit, match=message):
        main(["sample", "models:/tiny-controlnet@champion", *args, "--out", str(tmp_path / "g.png"),
              "--tracking-uri", tiny_mlflow.uri])
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit, match="--control needs a ControlNet model"):
        main(["sample", "models:/tiny-ddpm@champion", "--control", pic, "--tracking-uri", tiny_mlflow.uri])
