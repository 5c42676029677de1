"""diffpath.data.files / discover / export: finding, decoding, preprocessing and writing image
files (no model needed)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffpath.cli import main
from diffpath.data.export import export_images
from diffpath.data.files import (
    ImageReadError,
    ImageSkippedWarning,
    NoImagesError,
    Preprocessing,
    find_images,
    load_images,
    preprocess,
    read_image,
)


def _gray(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_every_format(folder: Path, gray: np.ndarray) -> dict[str, Path]:
    """One file per (format, mode) of the issue, odd sizes, built around a uint8 gray image.

    Returns ``{name: path}``. Used by test_detector too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = np.ascontiguousarray(gray)
    rgb = np.stack([g, g[::-1], 255 - g], axis=-1)
    alpha = np.full(g.shape, 200, np.uint8)
    out = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        p = folder / name
        im.save(p, **kw)
        out[name] = p

    save("gray_L.png", Image.fromarray(g, "L"))
    save("rgb.JPG", Image.fromarray(rgb, "RGB"), quality=95)  # upper-case extension
    save("rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    save("palette_P.png", Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE))
    save("gray16.png", Image.fromarray(g.astype(np.uint16) * 257))
    save("gray16.tif", Image.fromarray(g.astype(np.uint16) * 257))
    save("int32_I.tif", Image.fromarray(g.astype(np.int32) * 257))
    save("la.png", Image.fromarray(np.dstack([g, alpha]), "LA"))
    save("cmyk.jpg", Image.fromarray(rgb, "RGB").convert("CMYK"), quality=95)
    save("cmyk.tiff", Image.fromarray(rgb, "RGB").convert("CMYK"))
    save("gray.bmp", Image.fromarray(g, "L"))
    save("bilevel_1.bmp", Image.fromarray(g, "L").convert("1"))
    save("rgb.webp", Image.fromarray(rgb, "RGB"), lossless=True)
    save("rgba.webp", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), lossless=True)
    save("float_F.tif", Image.fromarray(g.astype(np.float32) / 255.0, "F"))
    return out


def test_every_format_and_mode_decodes(tmp_path):
    g = _gray(27, 31)  # odd sizes
    files = write_every_format(tmp_path, g)
    for name, p in files.items():
        a = read_image(p)
        assert a.dtype == np.uint8 and a.shape[:2] == (27, 31), name
        assert a.ndim == 2 or a.shape[2] == 3, name
    # lossless gray modes give the pixels back exactly, 16-bit ones scaled by their bit depth
    for name in ("gray_L.png", "gray.bmp", "gray16.png", "gray16.tif", "int32_I.tif", "float_F.tif"):
        np.testing.assert_array_equal(read_image(files[name]), g, err_msg=name)
    # RGBA composited over black (alpha 200): round(c·200/255)
    rgb = np.stack([g, g[::-1], 255 - g], axis=-1)
    want = ((rgb.astype(np.uint32) * 200 + 127) // 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(files["rgba.png"]), want)
    np.testing.assert_array_equal(read_image(files["rgba.webp"]), want)
    np.testing.assert_array_equal(read_image(files["rgba.png"], alpha="drop"), rgb)
    np.testing.assert_array_equal(read_image(files["la.png"], alpha="drop"), g)
    # palette → RGB through the palette; CMYK → RGB by Pillow's (exact for a TIFF round trip)
    pal = Image.open(files["palette_P.png"]).convert("RGB")
    np.testing.assert_array_equal(read_image(files["palette_P.png"]), np.asarray(pal))
    np.testing.assert_array_equal(read_image(files["cmyk.tiff"]), rgb)
    assert set(np.unique(read_image(files["bilevel_1.bmp"]))) <= {0, 255}


def _png_gray16_with_sbit(path: Path, values: np.ndarray, sbit: int) -> None:
    """A 16-bit gray PNG with an sBIT chunk (Pillow does not write sBIT)."""
    h, w = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + values[i].astype(">u2").tobytes() for i in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
           + chunk(b"sBIT", bytes([sbit])) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def test_16bit_scaled_by_declared_bit_depth(tmp_path):
    v = np.array([[0, 2048, 4095, 65535]], np.uint16)
    _png_gray16_with_sbit(tmp_path / "twelve.png", v, 12)
    a = read_image(tmp_path / "twelve.png")
    np.testing.assert_array_equal(a, [[0, 128, 255, 255]])  # 12-bit data: 4095 → 255, above clipped
    Image.fromarray(v).save(tmp_path / "sixteen.png")
    np.testing.assert_array_equal(read_image(tmp_path / "sixteen.png"), [[0, 8, 16, 255]])


def test_preprocess_modes_and_sizes():
    g = _gray(27, 31)
    for resize in ("auto", "bilinear", "center-crop", "pad"):
        for channels in (1, 3):
            x = preprocess(g, Preprocessing(32, channels, resize))
            assert x.shape == (channels, 32, 32) and x.dtype == np.float32
    # pad: odd differences put the extra row/column at the bottom/right, zero (= -1) background
    x = preprocess(g, Preprocessing(32, 1, "pad"))[0]
    np.testing.assert_array_equal(x[2:29, 0:31], g / np.float32(127.5) - 1)
    assert np.all(x[:2] == -1) and np.all(x[29:] == -1) and np.all(x[:, 31] == -1)
    # 28 → 32 under auto is data.to_model_input's symmetric zero padding
    f = _gray(28, 28, 1)
    np.testing.assert_array_equal(preprocess(f, Preprocessing(32, 1, "auto"))[0, 2:30, 2:30],
                                  f / np.float32(127.5) - 1)
    # center-crop keeps the middle square: a 20×40 image whose middle is bright
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255
    assert np.all(preprocess(wide, Preprocessing(20, 1, "center-crop")) == 1.0)
    with pytest.raises(ValueError, match="cannot be padded"):
        preprocess(_gray(40, 40), Preprocessing(32, 1, "pad"))
    with pytest.raises(ValueError, match="unknown resize"):
        Preprocessing(32, 1, "stretch")


def test_find_images_recursive_sorted_globs(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    g = Image.fromarray(_gray(8, 8))
    for rel in ("z.png", "a.JPEG", "b/deep/c.TIF", "b/x.webp", ".hidden/h.png", "notes.txt", "b/y.gif"):
        p = tmp_path / rel
        if p.suffix == ".txt":
            p.write_text("not an image")
        else:
            g.convert("RGB" if p.suffix.lower() in (".jpeg",) else "L").save(p)
    found = find_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.JPEG", "b/deep/c.TIF", "b/x.webp", "b/y.gif", "z.png"]
    assert find_images(str(tmp_path / "*.png")) == [tmp_path / "z.png"]
    assert [p.name for p in find_images(str(tmp_path / "**" / "*.webp"))] == ["x.webp"]
    # a file given twice (directly and through its folder) is kept once, first place
    both = find_images([tmp_path / "z.png", tmp_path])
    assert both[0] == tmp_path / "z.png" and len(both) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match="holds no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(NoImagesError, match="no images matched"):
        find_images(str(tmp_path / "*.bmp"))
    with pytest.raises(NoImagesError, match="no such file"):
        find_images(tmp_path / "missing")


def test_load_images_skips_corrupt_files_or_fails_strict(tmp_path):
    Image.fromarray(_gray(28, 28)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    full = tmp_path / "full.png"
    Image.fromarray(_rgb(40, 40)).save(full)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[:200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    files = sorted(tmp_path.iterdir())
    prep = Preprocessing(16, 1)
    with pytest.warns(ImageSkippedWarning) as rec:
        loaded = load_images(files, prep)
    assert [p.name for p in loaded.paths] == ["full.png", "ok.png"]
    assert loaded.x0.shape == (2, 1, 16, 16)
    assert sorted(p.name for p, _ in loaded.skipped) == ["corrupt.png", "empty.jpg", "truncated.png"]
    assert any("truncated.png" in str(w.message) for w in rec)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        load_images(files, prep, strict=True)
    with pytest.raises(NoImagesError, match="none of the 2"):
        load_images([tmp_path / "corrupt.png", tmp_path / "empty.jpg"], prep, on_skip=lambda p, r: None)
    # a memory-mapped buffer gives the same inputs
    buf = load_images(files, prep, buffer=tmp_path / "work" / "x0.npy", on_skip=lambda p, r: None)
    np.testing.assert_array_equal(np.asarray(buf.x0), loaded.x0)


def test_export_images(tmp_path):
    files = export_images("noise", tmp_path / "out", split="test", n=5)
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    assert read_image(files[0]).shape == (28, 28)
    assert main(["export-images", "noise", "--split", "test", "--n", "3", "--format", "bmp",
                 "--out", os.fspath(tmp_path / "bmp")]) == 0
    assert len(find_images(tmp_path / "bmp")) == 3
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


# -- issue 15 ---------------------------------------------------------------------------------


def test_symlink_loops_count_each_image_once_and_end(tmp_path):
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    Image.fromarray(_gray(8, 8)).save(top / "sub" / "a.png")
    os.symlink("..", top / "sub" / "loop")  # a link back up: the walk must not follow it again
    assert find_images(top) == [top / "sub" / "a.png"]
    os.symlink("..", top / "sub" / "loop2")  # two such links made the walk never end
    assert find_images(top) == [top / "sub" / "a.png"]
    assert find_images(str(top / "**" / "*.png")) == [top / "sub" / "a.png"]
    # one file reached under two names (a link to it) is one image
    os.symlink(top / "sub" / "a.png", top / "alias.png")
    assert len(find_images(top)) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_non_utf8_file_names_are_found_and_read(tmp_path):
    Image.fromarray(_gray(8, 8)).save(tmp_path / "ok.png")
    os.link(os.fsencode(tmp_path / "ok.png"), os.fsencode(tmp_path) + b"/caf\xe9.png")
    found = find_images(tmp_path)
    assert len(found) == 2
    loaded = load_images(found, Preprocessing(8, 1))
    np.testing.assert_array_equal(loaded.x0[0], loaded.x0[1])


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A valid 1-bit PNG of w×h black pixels (tiny on disk, huge decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    idat = zlib.compress(row * h, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    from diffpath.data import files

    big = tmp_path / "big.png"
    _png_header_only(big, 10000, 10000)
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(big)
    Image.fromarray(_gray(8, 8)).save(tmp_path / "ok.png")
    with pytest.warns(ImageSkippedWarning, match="big.png"):
        loaded = load_images([big, tmp_path / "ok.png"], Preprocessing(8, 1))
    assert [p.name for p in loaded.paths] == ["ok.png"]
    assert files.MAX_PIXELS < 10000 * 10000


def test_exported_files_have_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        files = export_images("noise", tmp_path / "out", split="test", n=2)
    finally:
        os.umask(umask)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(0o644)] * 2
