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
from pipeline.diffusion import Schedule, sample_ddim
from pipeline.train.controlnet_task import control_from_image
from pipeline.train.export import load_exported
from tests.eval.conftest import DIFFUSION, EDGES


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
    rgb = skdata.astronaut()  # 512×512: each of the 8×8 pixels stands for a 64×64 block
    edges, picture = control_from_image(_png(tmp_path / "astronaut.png", rgb), meta)
    assert edges.shape == picture.shape == (1, 1, 8, 8)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 grey, as PIL's "L"
    blocks = luma.reshape(8, 64, 8, 64).mean(axis=(1, 3)) / 127.5 - 1.0
    got = picture[0, 0].double().numpy()
    assert abs(got.mean() - blocks.mean()) < 0.02 and np.abs(got - blocks).mean() < 0.1  # grey, in [-1, 1]
    expected = canny((got + 1) / 2, sigma=EDGES["sigma"], low_threshold=EDGES["low_threshold"],
                     high_threshold=EDGES["high_threshold"])
    assert torch.equal(edges[0, 0].bool(), torch.from_numpy(expected))  # the edges of the picture returned


def test_sample_command_draws_rows_that_start_with_the_control(tmp_path, tiny_mlflow, capsys):
    pics = [_png(tmp_path / "camera.png", skdata.camera()), _png(tmp_path / "coins.png", skdata.coins())]
    out = tmp_path / "grid.png"
    rc = main(["sample", "models:/tiny-controlnet@champion", "--control", pics[0], "--control", pics[1],
               "--label", "2", "--num", "3", "--steps", "4", "--out", str(out), "--tracking-uri", tiny_mlflow.uri])
    assert rc == 0 and "following the edges of 2 picture(s)" in capsys.readouterr().out
    # Independently of what the command calls: the zero-initialised ControlNet draws what its base draws from
    # the same noise (DDIM on the base's own forward), and each row is [the picture's edges, 3 samples], the
    # edges the Canny map of the picture turned grey and resized to 8×8, white on black.
    base, _ = load_exported(tiny_mlflow.dirs["tiny-ddpm"])
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((6, 1, 8, 8), generator=g)
    labels = torch.full((6,), 2)
    with torch.no_grad():
        samples = sample_ddim(lambda x, t: base(x, t, y=labels), Schedule.make(DIFFUSION["schedule"],
                              DIFFUSION["timesteps"]), x_t, 4, parameterization=DIFFUSION["parameterization"],
                              generator=g).clamp(-1, 1)
    grid = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("L"))
    assert grid.shape == ((2 * 9 + 1) * 4, (4 * 9 + 1) * 4)
    assert (grid.reshape(19, 4, 37, 4) == grid[::4, ::4][:, None, :, None]).all()  # 4× nearest upscale
    cells = grid[::4, ::4]
    assert (cells[::9] == 255).all() and (cells[:, ::9] == 255).all()  # white 1-pixel separators
    for r, path in enumerate(pics):
        with Image.open(path) as img:
            small = np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255.0
        edge = canny(small, sigma=EDGES["sigma"], low_threshold=EDGES["low_threshold"],
                     high_threshold=EDGES["high_threshold"])
        tile = cells[1 + r * 9:9 + r * 9]
        np.testing.assert_array_equal(tile[:, 1:9], np.where(edge, 255, 0))
        for k in range(3):
            want = ((samples[r * 3 + k, 0].double().numpy() + 1) * 127.5)
            assert np.abs(tile[:, 1 + (k + 1) * 9:9 + (k + 1) * 9] - want).max() <= 0.5 + 1e-3  # 8-bit rounding
    assert any(cells[1 + r * 9:9 + r * 9, 1:9].any() for r in range(2))  # some edges: the check above bites


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
