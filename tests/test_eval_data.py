"""`mame-export eval` data: folder layouts, class indices, safe image reading, clips,
UNet latents, and batches that stream."""

from __future__ import annotations

import os
import time
import types
import warnings

import numpy as np
import pytest
import torch
from helpers import cli_error, write_png
from PIL import Image

from mame_export.evaluate import data as ed
from mame_export.evaluate import files as ef


def _as_tensor(im) -> torch.Tensor:
    """Pixels in [0, 1], (3, H, W): a transform with no resizing, to compare values."""
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)


def _eval_error(*argv: str) -> str:
    """The one error line of an eval of the random tiny timm ViT on ``argv``, exit 2."""
    return cli_error("eval", "vit_tiny_patch16_224", "--weights", "random", *argv)


# ---- class folders (item 7, 14) ---------------------------------------------------------


def test_empty_class_folder_is_refused_instead_of_shifting_the_labels(tmp_path):
    (tmp_path / "apple").mkdir()
    for i in range(3):
        write_png(tmp_path / "banana" / f"{i}.png")
    write_png(tmp_path / "cherry" / "0.png")
    with pytest.raises(ed.DataError, match=r"class folder .*apple holds no images"):
        ed.find_images(tmp_path)


def test_empty_class_folder_is_one_line_exit_2_from_the_cli(tmp_path):
    (tmp_path / "apple").mkdir()
    write_png(tmp_path / "banana" / "0.png")
    assert "apple" in _eval_error("--data", str(tmp_path))


def test_class_with_images_only_in_sub_folders_is_refused(tmp_path):
    write_png(tmp_path / "cat" / "0.png")
    write_png(tmp_path / "dog" / "puppies" / "0.png")
    with pytest.raises(ed.DataError, match=r"dog holds no images directly.*puppies/"):
        ed.find_images(tmp_path)


def test_images_beside_class_folders_are_refused_not_dropped(tmp_path):
    write_png(tmp_path / "cat" / "0.png")
    write_png(tmp_path / "stray.png")
    with pytest.raises(ed.DataError, match="holds both images .*stray.png"):
        ed.find_images(tmp_path)


def test_a_flat_folder_ignores_sub_folders_without_images(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "notes").mkdir()
    images = ed.find_images(tmp_path)
    assert images.labels is None and [p.name for p in images.paths] == ["a.png"]


@pytest.mark.parametrize("names", [("3", "²"), ("5", "٣")])  # isdigit / isdecimal accept them
def test_only_ascii_digit_folder_names_are_class_indices(tmp_path, names):
    for n in names:
        write_png(tmp_path / n / "0.png")
    images = ed.find_images(tmp_path)
    assert "sorted order" in images.mapping
    assert sorted(images.labels) == [0, 1] and images.class_names == tuple(sorted(names))


def test_two_folders_naming_the_same_class_index_are_refused(tmp_path):
    write_png(tmp_path / "7" / "0.png")
    write_png(tmp_path / "007" / "0.png")
    with pytest.raises(ed.DataError, match="007/ and 7/ both name class 7"):
        ed.find_images(tmp_path)


def test_hidden_files_and_special_files_are_skipped(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"AppleDouble resource fork")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block
    images = ed.find_images(tmp_path)
    assert [p.name for p in images.paths] == ["a.png"]
    assert len(next(ed.load_batches(images, _as_tensor, 4))) == 1


def test_a_broken_link_is_refused_not_skipped(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")  # e.g. a renamed .jpg
    (tmp_path / "c.png").symlink_to(tmp_path / "a.png")  # a good link is followed
    with pytest.raises(ed.DataError, match=r"b\.png is a broken link .*gone\.png"):
        ed.find_images(tmp_path)
    (tmp_path / "b.png").unlink()
    assert [p.name for p in ed.find_images(tmp_path).paths] == ["a.png", "c.png"]


# ---- unreadable folders (item 15) -------------------------------------------------------


def _deny(monkeypatch, denied) -> None:
    """Listing ``denied`` raises PermissionError (tests run as root: chmod cannot deny)."""
    scandir, listdir = os.scandir, os.listdir

    def check(path):
        if os.fspath(path) == os.fspath(denied):
            raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "scandir", lambda p=".": check(p) or scandir(p))
    monkeypatch.setattr(os, "listdir", lambda p=".": check(p) or listdir(p))


@pytest.mark.parametrize("denied", ["", "cat"])
def test_a_folder_that_cannot_be_listed_is_one_error_naming_it(tmp_path, monkeypatch, denied):
    write_png(tmp_path / "cat" / "0.png")
    write_png(tmp_path / "dog" / "0.png")
    _deny(monkeypatch, tmp_path / denied if denied else tmp_path)
    with pytest.raises(ed.DataError, match="permission denied") as info:
        ed.find_images(tmp_path)
    assert str(tmp_path / denied if denied else tmp_path) in str(info.value)


def test_a_data_folder_that_cannot_be_reached_is_one_error(tmp_path, monkeypatch):
    stat = os.stat

    def deny(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", deny)
    with pytest.raises(ed.DataError, match=r"data folder .* cannot be read \(permission denied"):
        ed.find_images(tmp_path)


def test_proc_is_refused_quickly():
    start = time.monotonic()
    with pytest.raises(ed.DataError):
        ed.find_images("/proc")
    with pytest.raises(ed.DataError):
        ed.find_clips("/proc", 8)
    _eval_error("--data", "/proc")
    assert time.monotonic() - start < 30


# ---- reading images (item 9, 13) -------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_reads_as_its_8_bit_value_not_white(tmp_path, suffix):
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / f"g16{suffix}")
    write_png(tmp_path / "g8.png", 128)
    images = ed.find_images(tmp_path)
    assert [p.name for p in images.paths] == ["g16" + suffix, "g8.png"]
    b = next(ed.load_batches(images, _as_tensor, 2))
    torch.testing.assert_close(b[0], b[1], atol=1 / 255, rtol=0)


def test_16_bit_range_maps_onto_the_8_bit_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None, :].repeat(2, 0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    im = ef.read_rgb(tmp_path / "ramp.png")
    assert im.mode == "RGB" and np.asarray(im)[0, :, 0].tolist() == list(range(256))


def test_float_image_in_0_1_is_scaled_and_outside_is_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert np.asarray(ef.read_rgb(tmp_path / "half.tif")).max() == 128
    Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(ed.DataError, match=r"big.tif is a float image with \[300, 300\]"):
        ef.read_rgb(tmp_path / "big.tif")


def test_32_bit_integer_image_beyond_16_bits_is_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ed.DataError, match=r"i32.tif \(mode I\) has values in \[70000"):
        ef.read_rgb(tmp_path / "i32.tif")


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bomb")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 50 KB on disk, 400 M pixels
    return folder


def test_decompression_bomb_is_one_data_error_stating_the_limit(bomb_folder):
    images = ed.find_images(bomb_folder)
    with pytest.raises(ed.DataError, match=r"bomb.png is over eval's limit of 89,478,485 "
                                           r"pixels \(400,000,000 pixels\).*decompression"):
        next(ed.load_batches(images, _as_tensor, 1))


def test_an_image_over_the_limit_is_refused_before_decoding_without_a_warning(
        tmp_path, monkeypatch):
    monkeypatch.setattr(ef, "MAX_IMAGE_PIXELS", 1000)
    write_png(tmp_path / "big.png", size=(40, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ed.DataError, match=r"40x40 = 1,600 pixels"):
            ef.read_rgb(tmp_path / "big.png")


def test_decompression_bomb_is_one_line_exit_2_from_the_cli(bomb_folder):
    err = _eval_error("--data", str(bomb_folder), "--img-size", "32", "--no-tome")
    assert "decompression bomb" in err


def test_a_corrupt_image_is_one_error_naming_it(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ed.DataError, match="cannot read image .*bad.png"):
        ef.read_rgb(tmp_path / "bad.png")


# ---- streaming (item 21) ---------------------------------------------------------------


def test_load_batches_streams_one_batch_at_a_time(tmp_path):
    for i in range(10):
        write_png(tmp_path / f"{i}.png", 10 * i)
    calls = []

    def transform(im):
        calls.append(1)
        return _as_tensor(im)

    batches = ed.load_batches(ed.find_images(tmp_path), transform, 4)
    assert isinstance(batches, types.GeneratorType) and not calls
    assert next(batches).shape == (4, 3, 8, 8) and len(calls) == 4
    assert [len(b) for b in batches] == [4, 2] and len(calls) == 10


def test_a_bad_batch_size_is_refused_before_any_image_is_read(tmp_path):
    write_png(tmp_path / "a.png")
    with pytest.raises(ed.DataError, match="--batch must be"):
        ed.load_batches(ed.find_images(tmp_path), _as_tensor, 0)


# ---- transforms ------------------------------------------------------------------------


def test_transform_from_matches_the_timm_data_config_transform(tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    cfg = resolve_data_config({}, model=model)
    timm_tf = create_transform(**{**cfg, "input_size": (3, 32, 32)}, is_training=False)
    write_png(tmp_path / "a.png", size=(50, 70))
    im = ef.read_rgb(tmp_path / "a.png")
    ours = ed.transform_for(model)(im)
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, timm_tf(im))
    explicit = ed.transform_from(cfg["mean"], cfg["std"], 32, crop_pct=cfg["crop_pct"],
                                 interpolation=cfg["interpolation"])
    torch.testing.assert_close(explicit(im), ours)


def test_transform_from_refuses_bad_values():
    with pytest.raises(ValueError, match="std > 0"):
        ed.transform_from((0.5,) * 3, (0.5, 0.0, 0.5), 32)
    with pytest.raises(ValueError, match="crop_pct"):
        ed.transform_from((0.5,) * 3, (0.5,) * 3, 32, crop_pct=0.0)


# ---- clips (issue 18) ------------------------------------------------------------------


def _clip(folder, frames: int) -> None:
    for i in range(frames):
        write_png(folder / f"{i:03d}.png", 20 * i)


def test_unlabelled_clips_take_evenly_spaced_frames_and_batch_on_a_time_axis(tmp_path):
    _clip(tmp_path / "a", 10)
    _clip(tmp_path / "b", 4)
    clips = ed.find_clips(tmp_path, 4)
    assert clips.kind == "clips" and clips.labels is None and len(clips.paths) == 2
    assert [f.stem for f in clips.frames[0]] == ["001", "003", "006", "008"]
    assert [f.stem for f in clips.frames[1]] == ["000", "001", "002", "003"]
    (batch,) = ed.load_batches(clips, _as_tensor, 2)
    assert batch.shape == (2, 3, 4, 8, 8)
    assert batch[0, 0, :, 0, 0].mul(255).round().tolist() == [20, 60, 120, 160]


def test_labelled_clips_map_classes_and_limit_round_robins(tmp_path):
    for name in ("walk", "run"):
        for c in range(2):
            _clip(tmp_path / name / f"clip{c}", 2)
    clips = ed.find_clips(tmp_path, 2, limit=3)
    assert clips.class_names == ("run", "walk") and clips.labels == (0, 1, 0)
    assert [p.parent.name for p in clips.paths] == ["run", "walk", "run"]


def test_a_clip_with_too_few_frames_is_one_line_naming_it_and_the_counts(tmp_path):
    _clip(tmp_path / "long", 8)
    _clip(tmp_path / "short", 3)
    with pytest.raises(ed.DataError, match=r"clip .*short has 3 frames; the model takes 8"):
        ed.find_clips(tmp_path, 8)


def test_video_files_are_refused_with_how_to_extract_frames(tmp_path):
    (tmp_path / "walk").mkdir()
    (tmp_path / "walk" / "v.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(ed.DataError, match=r"v.mp4 is a video file.*ffmpeg -i"):
        ed.find_clips(tmp_path, 4)


@pytest.mark.parametrize("layout, message", [
    ({"a.png": None}, "holds images directly"),
    ({"c1/0.png": None, "cls/c2/0.png": None}, "mixes clips"),
    ({"run/c1/0.png": None, "walk": "dir"}, r"walk holds no clips"),
    ({"x/0.png": None, "x/sub/0.png": None}, "holds both frames and sub-folders"),
])
def test_clip_layout_errors_are_one_line(tmp_path, layout, message):
    for rel, kind in layout.items():
        if kind == "dir":
            (tmp_path / rel).mkdir(parents=True)
        else:
            write_png(tmp_path / rel)
    with pytest.raises(ed.DataError, match=message) as info:
        ed.find_clips(tmp_path, 1)
    assert "\n" not in str(info.value)


# ---- UNet latents ----------------------------------------------------------------------


def test_latents_stream_in_batches_across_files(tmp_path):
    from safetensors.torch import save_file

    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.float32))
    np.save(tmp_path / "b.npy", np.ones((3, 4, 8, 8), np.float16))
    save_file({"x": torch.full((4, 8, 8), 2.0)}, str(tmp_path / "c.safetensors"))
    paths = ed.find_latents(tmp_path)
    assert [p.name for p in paths] == ["a.npy", "b.npy", "c.safetensors"]
    batches = ed.load_latents(paths, 2, (4, 8, 8))
    assert isinstance(batches, types.GeneratorType)
    got = list(batches)
    assert [tuple(b.shape) for b in got] == [(2, 4, 8, 8), (2, 4, 8, 8), (1, 4, 8, 8)]
    assert all(b.dtype == torch.float32 for b in got)
    assert torch.cat(got)[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 2]
    assert ed.find_latents(tmp_path, limit=1) == paths[:1]


def test_a_folder_of_images_is_refused_for_a_unet(tmp_path):
    write_png(tmp_path / "a.png")
    with pytest.raises(ed.DataError, match=r"eval of a UNet takes latents \(.npy/.safetensors"
                                           r"\), not images"):
        ed.find_latents(tmp_path)


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 16, 16), np.float32), r"bad.npy has shape \(4, 16, 16\)"),
    (np.zeros((4, 8, 8), np.int64), "dtype int64"),
    (np.full((4, 8, 8), np.nan, np.float32), "NaN"),
    (np.array([{"a": 1}], dtype=object), "cannot read latent .*bad.npy"),
])
def test_a_bad_latent_file_is_one_error_naming_it(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    with pytest.raises(ed.DataError, match=message) as info:
        list(ed.load_latents([tmp_path / "bad.npy"], 2, (4, 8, 8)))
    assert "\n" not in str(info.value)
