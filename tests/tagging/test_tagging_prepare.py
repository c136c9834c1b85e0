from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.atomic import write_parquet
from common.hashing import bytes_sha256
from tagging.prepare import MANIFEST_COLUMNS, PrepareOptions, contact_sheet, prepare_images

SMALL = PrepareOptions(size=16)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def three_bands(path: Path) -> Path:
    """60 x 20: red | blue | green, so the centre square crop is pure blue."""
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    image.paste((0, 255, 0), (40, 0, 60, 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # lossless whatever the suffix: decoding goes by content
    return path


def test_centre_crop_resize_and_manifest(tmp_path: Path, solid_image) -> None:
    src, out = tmp_path / "raw", tmp_path / "out"
    three_bands(src / "sub" / "My Cat.JPG")
    solid_image(src / "b.jpg", (0, 200, 0), size=(30, 50))
    manifest = prepare_images(src, out, SMALL)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest["source"].tolist() == ["b.jpg", "sub/My Cat.JPG"]
    assert manifest["output"].tolist() == ["b.png", "sub__My Cat.png"]
    assert set(manifest["status"]) == {"processed"}
    assert manifest["width"].tolist() == [16, 16] and manifest["height"].tolist() == [16, 16]
    assert (manifest["options"] == SMALL.fingerprint()).all()
    cropped = np.asarray(Image.open(out / "sub__My Cat.png"))
    assert cropped.shape == (16, 16, 3)
    assert (np.abs(cropped.astype(int) - [0, 0, 255]).max(axis=2) <= 2).all()


def test_flipped_copies_are_their_own_rows(tmp_path: Path) -> None:
    src, out = tmp_path / "raw", tmp_path / "out"
    image = Image.new("RGB", (20, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 10, 20))
    src.mkdir()
    image.save(src / "half.png")
    manifest = prepare_images(src, out, PrepareOptions(size=20, flip=True))
    assert manifest[["output", "flipped"]].values.tolist() == [["half.png", False], ["half__flip.png", True]]
    plain, flipped = np.asarray(Image.open(out / "half.png")), np.asarray(Image.open(out / "half__flip.png"))
    assert np.array_equal(flipped, plain[:, ::-1])


def test_name_collisions_are_resolved_independent_of_order(tmp_path: Path, solid_image) -> None:
    src = tmp_path / "raw"
    names = ["a.png", "a.jpg", "sub/x.png", "sub__x.png", "Case.png", "case.PNG", "unique.png"]
    for index, name in enumerate(names):  # distinct colours: identical files would be exact duplicates
        solid_image(src / name, (index * 30, 0, 0))
    manifest = prepare_images(src, tmp_path / "out", SMALL)
    outputs = dict(zip(manifest["source"], manifest["output"]))
    assert len({name.casefold() for name in outputs.values()}) == 7
    assert outputs["unique.png"] == "unique.png"
    assert outputs["a.png"].startswith("a~") and outputs["a.jpg"].startswith("a~")
    # Removing the colliding partner lets a file keep a stable, plain name again; adding files elsewhere
    # never renames it.
    (src / "a.jpg").unlink()
    solid_image(src / "zzz.png", (0, 0, 99))
    again = prepare_images(src, tmp_path / "out", SMALL)
    assert dict(zip(again["source"], again["output"]))["a.png"] == "a.png"


def test_unresolvable_name_clash_is_reported(tmp_path: Path, solid_image) -> None:
    src = tmp_path / "raw"
    for name in ["x.png", "x.jpg", f"x~{bytes_sha256(b'x.png')[:10]}.png"]:  # the third mimics a suffixed name
        solid_image(src / name)
    with pytest.raises(ValueError, match="cannot give these sources distinct output names"):
        prepare_images(src, tmp_path / "out", SMALL)


def test_second_run_reuses_outputs_without_decoding_or_rewriting(tmp_path: Path, solid_image, monkeypatch) -> None:
    src, out = tmp_path / "raw", tmp_path / "out"
    solid_image(src / "one.png", (10, 20, 30), size=(40, 30))
    solid_image(src / "two.png", (200, 100, 0))
    options = PrepareOptions(size=16, flip=True)
    first = prepare_images(src, out, options)
    before = snapshot(out)
    write_parquet(tmp_path / "manifest.parquet", first)
    monkeypatch.setattr("tagging.prepare_cache.load_rgb", lambda *args, **kwargs: pytest.fail("decoded a reusable image"))
    second = prepare_images(src, out, options, previous=pd.read_parquet(tmp_path / "manifest.parquet"))
    assert set(second["status"]) == {"reused"}
    assert second.drop(columns="status").equals(first.drop(columns="status"))
    assert snapshot(out) == before


def test_changed_source_or_options_or_damaged_output_is_processed_again(tmp_path: Path, solid_image) -> None:
    src, out = tmp_path / "raw", tmp_path / "out"
    solid_image(src / "one.png", (10, 20, 30))
    solid_image(src / "two.png", (200, 100, 0))
    solid_image(src / "three.png", (0, 0, 0))
    first = prepare_images(src, out, SMALL)
    solid_image(src / "one.png", (90, 90, 90))
    (out / "two.png").write_bytes(b"tampered")
    second = prepare_images(src, out, SMALL, previous=first)
    assert dict(zip(second["source"], second["status"])) == {"one.png": "processed", "three.png": "reused", "two.png": "processed"}
    assert Image.open(out / "two.png").size == (16, 16)
    third = prepare_images(src, out, PrepareOptions(size=8), previous=second)
    assert set(third["status"]) == {"processed"} and set(third["width"]) == {8}


def test_same_input_gives_same_bytes(tmp_path: Path) -> None:
    three_bands(tmp_path / "raw" / "x.png")
    one = prepare_images(tmp_path / "raw", tmp_path / "one", SMALL)
    two = prepare_images(tmp_path / "raw", tmp_path / "two", SMALL)
    assert (tmp_path / "one" / "x.png").read_bytes() == (tmp_path / "two" / "x.png").read_bytes()
    assert one["sha256"].tolist() == two["sha256"].tolist()


def test_stale_outputs_and_their_captions_are_removed(tmp_path: Path, solid_image) -> None:
    src, out = tmp_path / "raw", tmp_path / "out"
    solid_image(src / "keep.png", (1, 2, 3))
    solid_image(src / "gone.png", (4, 5, 6))
    first = prepare_images(src, out, PrepareOptions(size=16, flip=True))
    for stem in ["keep", "gone", "gone__flip"]:
        (out / f"{stem}.txt").write_text("a caption")
    (out / "notes.json").write_text("{}")
    (src / "gone.png").unlink()
    prepare_images(src, out, PrepareOptions(size=16, flip=True), previous=first)
    assert sorted(p.name for p in out.iterdir()) == ["keep.png", "keep.txt", "keep__flip.png", "notes.json"]


def test_raw_folder_is_never_modified(tmp_path: Path, solid_image) -> None:
    src = tmp_path / "raw"
    solid_image(src / "a.png", mode="RGBA", colour=(255, 0, 0, 100))
    solid_image(src / "deep" / "b.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (src / "a.txt").write_text("user caption")
    before = snapshot(src)
    prepare_images(src, tmp_path / "out", PrepareOptions(size=16, flip=True))
    assert snapshot(src) == before


def test_bad_files_become_skipped_rows(tmp_path: Path, solid_image) -> None:
    src = tmp_path / "raw"
    solid_image(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    solid_image(src / "tiny.png", size=(4, 4))
    manifest = prepare_images(src, tmp_path / "out", PrepareOptions(size=16, min_side=8))
    rows = manifest.set_index("source")
    assert rows.loc["good.png", "status"] == "processed"
    assert rows.loc["empty.png", "reason"] == "zero-byte file"
    assert rows.loc["text.jpg", "reason"] == "not an image (content is not a known format)"
    assert rows.loc["tiny.png", "reason"].startswith("too small")
    skipped = manifest[manifest["status"] == "skipped"]
    assert skipped["output"].isna().all() and skipped["width"].isna().all()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_output_inside_source_is_refused(tmp_path: Path, solid_image) -> None:
    solid_image(tmp_path / "raw" / "a.png")
    with pytest.raises(ValueError, match="must not be the source folder"):
        prepare_images(tmp_path / "raw", tmp_path / "raw" / "prepared", SMALL)
    with pytest.raises(ValueError, match="must not be the source folder"):
        prepare_images(tmp_path / "raw", tmp_path / "raw", SMALL)


def test_options_validate_and_fingerprint() -> None:
    assert PrepareOptions().fingerprint() == PrepareOptions().fingerprint()
    assert PrepareOptions(size=256).fingerprint() != PrepareOptions().fingerprint()
    assert PrepareOptions(background=[0, 0, 0]).fingerprint() == PrepareOptions(background=(0, 0, 0)).fingerprint()
    with pytest.raises(ValueError, match="resample"):
        PrepareOptions(resample="sinc")
    with pytest.raises(ValueError, match="size"):
        PrepareOptions(size=0)


def test_contact_sheet_grid(tmp_path: Path, solid_image) -> None:
    paths = [solid_image(tmp_path / f"{i}.png", (0, 0, 255), size=(40, 20)) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"nope")
    sheet = contact_sheet(paths + [tmp_path / "bad.png"], columns=4, cell=32)
    assert sheet.size == (128, 64)
    assert sheet.getpixel((16, 16)) == (0, 0, 255)  # thumbnail centred in its cell
    assert sheet.getpixel((16, 2)) == (255, 255, 255)  # letterbox of a wide image
    assert sheet.getpixel((48, 48)) == (128, 128, 128)  # the unreadable image
    assert contact_sheet(paths, columns=8, cell=10, max_images=3).size == (30, 10)
    with pytest.raises(ValueError):
        contact_sheet([])


def test_non_utf8_file_name_is_skipped_not_a_crash(tmp_path: Path, solid_image) -> None:
    src = tmp_path / "raw"
    solid_image(src / "good.png")
    try:
        # A Linux file name is bytes; this one is not UTF-8 (as copied from an old Latin-1 archive).
        solid_image(Path(os.fsdecode(os.fsencode(src) + b"/caf\xe9.png")))
    except OSError:
        pytest.skip("this file system only stores UTF-8 names")
    manifest = prepare_images(src, tmp_path / "out", SMALL)
    rows = manifest.set_index("source")
    assert rows.loc["good.png", "status"] == "processed"
    assert rows.loc["caf\\xe9.png", "status"] == "skipped"
    assert rows.loc["caf\\xe9.png", "reason"] == "file name is not valid UTF-8 (rename the file)"
    write_parquet(tmp_path / "manifest.parquet", manifest)  # the manifest must stay storable
