"""Data prep (every SOURCE kind, bad inputs, atomic output), builtin:shapes, PreparedDataset and
the ``reptok data`` CLI. Everything is tiny and offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reptok.data import (
    CLASS_NAMES, COLOURS, SHAPES, PreparedDataset, caption_class, class_of, dataset_info, make_shapes,
    parse_class, prepare,
)
from reptok.data import prep as prep_mod
from reptok.errors import InputError
from reptok.images import center_crop_arr


def _png(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- builtin:shapes
def test_shapes_deterministic_and_prefix_stable():
    a = make_shapes(24, resolution=32, seed=3)
    b = make_shapes(24, resolution=32, seed=3)
    c = make_shapes(24, resolution=32, seed=4)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (24, 32, 32, 3)
    assert a["labels"].dtype == np.int64 and a["labels"].shape == (24,)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["captions"] == b["captions"]
    assert not np.array_equal(a["images"], c["images"])
    # Image i depends only on (seed, i): a prefix of a bigger set is the smaller set.
    np.testing.assert_array_equal(make_shapes(10, seed=3)["images"], a["images"][:10])
    assert a["class_names"] == CLASS_NAMES and len(CLASS_NAMES) == 12
    # Class-balanced, and the caption names the class.
    assert np.bincount(a["labels"], minlength=12).tolist() == [2] * 12
    for label, cap in zip(a["labels"], a["captions"]):
        shape, colour = parse_class(label)
        assert f"{colour} {shape}" in cap and cap.endswith("background")
        assert caption_class(cap) == label
    # Varied: positions/sizes/backgrounds differ within a class.
    same = a["images"][a["labels"] == 0]
    assert not np.array_equal(same[0], same[1])


def test_shape_class_helpers():
    assert SHAPES == ("circle", "ring", "bar", "cross") and COLOURS == ("red", "green", "blue")
    for k in range(12):
        assert class_of(*parse_class(k)) == k
        assert CLASS_NAMES[k] == "{1} {0}".format(*parse_class(k))
    assert class_of("bar", "blue") == 2 * 3 + 2
    assert caption_class("a red circle and a blue ring") is None
    with pytest.raises(ValueError):
        parse_class(12)


def test_shapes_resolution():
    d = make_shapes(4, resolution=64, seed=0)
    assert d["images"].shape == (4, 64, 64, 3)


# ----------------------------------------------------------------------------- prep: each SOURCE kind
def test_prep_builtin_limit_and_dataset(tmp_path):
    out = tmp_path / "shapes"
    s = prepare("builtin:shapes", out, limit=40)
    assert s["count"] == 40 and s["resolution"] == 32 and s["num_classes"] == 12
    assert s["class_names"] == CLASS_NAMES and s["has_captions"] and s["skipped"] == 0
    meta = json.loads((out / "reptok_data.json").read_text())
    assert meta["format"] == "reptok-data/1" and meta["source"] == "builtin:shapes" and meta["count"] == 40
    assert (out / "skipped.txt").read_text() == ""

    ds = PreparedDataset(out)
    ref = make_shapes(40, 32, seed=0)
    assert len(ds) == 40 and ds.resolution == 32 and ds.num_classes == 12 and ds.has_captions
    item = ds[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.int64 and int(item["label"]) == ref["labels"][7] and item["index"] == 7
    batch = ds.get_batch([3, 0, 39, 3])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == ref["labels"][[3, 0, 39, 3]].tolist()
    assert batch["index"].tolist() == [3, 0, 39, 3]
    np.testing.assert_array_equal(ds.get_uint8(np.arange(40)), ref["images"])
    # float image is exactly uint8 / 127.5 - 1
    torch.testing.assert_close(item["image"], torch.from_numpy(ref["images"][7]).permute(2, 0, 1).float() / 127.5 - 1)
    assert ds.captions([0, 5]) == [ref["captions"][0], ref["captions"][5]]

    # The count suffix, and the seed changes the images.
    s2 = prepare("builtin:shapes:12", tmp_path / "s12", seed=5)
    assert s2["count"] == 12
    assert not np.array_equal(PreparedDataset(tmp_path / "s12").get_uint8([0]), ds.get_uint8([0]))
    with pytest.raises(InputError, match="unknown builtin"):
        prepare("builtin:mnist", tmp_path / "x")


def test_prep_class_folder_with_captions(tmp_path):
    src = tmp_path / "src"
    raw = {
        ("dog", "b.png"): _png(src / "dog" / "b.png", 40, 30, 1),
        ("dog", "a.png"): _png(src / "dog" / "a.png", 24, 24, 2),
        ("cat", "x.jpg"): None,
        ("cat", "sub/y.png"): _png(src / "cat" / "sub" / "y.png", 50, 20, 3),
    }
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(src / "cat" / "x.jpg", quality=95)
    (src / "dog" / "a.txt").write_text("a dog on grass\n")
    (src / "empty").mkdir()  # an empty sub-folder is not a class
    out = tmp_path / "out"
    s = prepare(str(src), out, resolution=16)
    assert s["source_kind"] == "folder"
    assert s["class_names"] == ["cat", "dog"] and s["num_classes"] == 2 and s["count"] == 4
    assert s["has_captions"]
    ds = PreparedDataset(out)
    # Sorted classes; files sorted by path within a class (recursive: cat/sub/y.png < cat/x.jpg).
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.captions(range(4)) == ["", "", "a dog on grass", ""]
    # ADM/DiT centre crop + resize.
    np.testing.assert_array_equal(ds.get_uint8([2])[0], center_crop_arr(Image.fromarray(raw[("dog", "a.png")]), 16))
    np.testing.assert_array_equal(ds.get_uint8([0])[0], center_crop_arr(Image.fromarray(raw[("cat", "sub/y.png")]), 16))


def test_prep_flat_folder_unlabelled_and_limit(tmp_path):
    src = tmp_path / "flat"
    for i in range(6):
        _png(src / f"img{i}.png", 20, 20, i)
    (src / "notes.md").write_text("not an image")
    s = prepare(str(src), tmp_path / "out", resolution=8, workers=1)  # the no-thread-pool path
    assert s["count"] == 6 and s["num_classes"] == 0 and s["class_names"] == [] and not s["has_captions"]
    assert PreparedDataset(tmp_path / "out").labels.tolist() == [-1] * 6
    # --limit on a folder: a seeded subset in input order.
    a = prepare(str(src), tmp_path / "l1", resolution=8, limit=3, seed=1)
    b = prepare(str(src), tmp_path / "l2", resolution=8, limit=3, seed=1)
    assert a["count"] == 3
    np.testing.assert_array_equal(PreparedDataset(tmp_path / "l1").get_uint8(range(3)),
                                  PreparedDataset(tmp_path / "l2").get_uint8(range(3)))


def test_prep_saved_hf_dataset(tmp_path):
    import datasets

    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({
        "img": datasets.Image(),
        "fine": datasets.ClassLabel(names=["apple", "pear", "plum"]),
        "text": datasets.Value("string"),
        "other": datasets.Value("int32"),
    })
    hf = datasets.Dataset.from_dict(
        {"img": imgs, "fine": [2, 0, 1, 2, 0], "text": [f"caption {i}" for i in range(5)], "other": list(range(5))},
        features=features,
    )
    saved = tmp_path / "saved"
    hf.save_to_disk(str(saved))
    s = prepare(str(saved), tmp_path / "out", resolution=16)
    assert s["source_kind"] == "huggingface"
    assert s["columns"] == {"image": "img", "label": "fine", "caption": "text"}
    assert s["class_names"] == ["apple", "pear", "plum"] and s["count"] == 5 and s["has_captions"]
    ds = PreparedDataset(tmp_path / "out")
    assert ds.labels.tolist() == [2, 0, 1, 2, 0]
    assert ds.captions([4]) == ["caption 4"]
    np.testing.assert_array_equal(ds.get_uint8([3])[0], center_crop_arr(imgs[3], 16))

    # Explicit columns: an integer label column without names; no captions.
    s2 = prepare(str(saved), tmp_path / "out2", resolution=16, label_column="other", caption_column="none")
    assert s2["num_classes"] == 5 and s2["class_names"] == ["0", "1", "2", "3", "4"] and not s2["has_captions"]
    with pytest.raises(InputError, match="no such column"):
        prepare(str(saved), tmp_path / "out3", image_column="nope")

    # A saved DatasetDict: --split picks the split.
    dd = datasets.DatasetDict({"train": hf, "test": hf.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert prepare(str(tmp_path / "dd"), tmp_path / "o4", resolution=8, split="test")["count"] == 2
    assert prepare(str(tmp_path / "dd"), tmp_path / "o5", resolution=8)["count"] == 5  # default: train
    with pytest.raises(InputError, match="no split"):
        prepare(str(tmp_path / "dd"), tmp_path / "o6", split="validation")


def test_prepared_output_is_a_hf_dataset_and_multi_shard(tmp_path, monkeypatch):
    import datasets

    # Force several shards (and several arrow chunks) to exercise the chunked gather.
    monkeypatch.setattr(prep_mod, "_SHARD_BYTES", 32 * 32 * 3 * 10)
    out = tmp_path / "out"
    prepare("builtin:shapes", out, limit=37, batch_size=8)
    assert len(list(out.glob("data-*.arrow"))) == 4
    hf = datasets.load_from_disk(str(out))
    assert hf.features["image"] == datasets.Array3D(shape=(3, 32, 32), dtype="uint8")  # CHW on disk
    assert hf.features["label"] == datasets.Value("int64") and hf.features["caption"] == datasets.Value("string")
    ref = make_shapes(37, 32, seed=0)
    np.testing.assert_array_equal(hf.with_format("numpy")["image"], ref["images"].transpose(0, 3, 1, 2))
    # Raw pixels with ~no container overhead (CHW: 3R list offsets per image, not R*R).
    size = sum(f.stat().st_size for f in out.glob("data-*.arrow"))
    assert size < 37 * 32 * 32 * 3 * 1.25
    ds = PreparedDataset(out)
    idx = np.random.default_rng(0).permutation(37)
    np.testing.assert_array_equal(ds.get_uint8(idx), ref["images"][idx])
    assert ds.get_batch(idx)["label"].tolist() == ref["labels"][idx].tolist()


# ----------------------------------------------------------------------------- bad inputs
def _bad_folder(root: Path, good: int = 2) -> None:
    for i in range(good):
        _png(root / f"good{i}.png", 20, 20, i)
    full = root / "trunc.png"
    _png(full, 64, 64, 9)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # a truncated PNG: opens, fails on .load()
    (root / "fake.jpg").write_bytes(b"this is not a jpeg")


def test_bad_images_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    _bad_folder(src)
    s = prepare(str(src), tmp_path / "out", resolution=8)
    assert s["count"] == 2 and s["skipped"] == 2 and s["unreadable"] == 2
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    report = dict(line.split("\t", 1) for line in lines)
    assert set(report) == {"trunc.png", "fake.jpg"}
    assert all(reason for reason in report.values())
    assert "truncated" in report["trunc.png"].lower()


def test_all_bad_is_input_error_and_cli_exit_2(tmp_path):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    src = tmp_path / "src"
    _bad_folder(src, good=0)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no usable images"):
        prepare(str(src), out, resolution=8)
    assert not out.exists() and _leftovers(tmp_path, "out") == []
    r = CliRunner().invoke(app, ["data", "prep", str(src), "--out", str(out), "--resolution", "8"])
    assert r.exit_code == 2, r.output
    assert "no usable images" in r.output
    assert not out.exists()
    # Missing source / empty folder are input errors too.
    r = CliRunner().invoke(app, ["data", "prep", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        prepare(str(tmp_path / "empty"), out)


def test_interrupt_leaves_nothing(tmp_path):
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the prep

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare("builtin:shapes:64", out, batch_size=8, progress=progress)
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare("builtin:shapes:5", out)
    with pytest.raises(InputError, match="--overwrite"):
        prepare("builtin:shapes:6", out)
    assert PreparedDataset(out).meta["count"] == 5
    prepare("builtin:shapes:6", out, overwrite=True)
    assert len(PreparedDataset(out)) == 6 and _leftovers(tmp_path, "out") == []
    # An existing empty directory is fine.
    (tmp_path / "empty").mkdir()
    prepare("builtin:shapes:3", tmp_path / "empty")
    assert len(PreparedDataset(tmp_path / "empty")) == 3


def test_not_a_prepared_dataset(tmp_path):
    with pytest.raises(InputError, match="reptok data prep"):
        PreparedDataset(tmp_path)
    with pytest.raises(InputError, match="reptok data prep"):
        dataset_info(tmp_path / "missing")


# ----------------------------------------------------------------------------- CLI
def test_cli_prep_and_info_json(tmp_path):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    out = tmp_path / "shapes"
    runner = CliRunner()
    r = runner.invoke(app, ["data", "prep", "builtin:shapes", "--limit", "24", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["count"] == 24 and summary["out"] == str(out) and summary["num_classes"] == 12

    r = runner.invoke(app, ["data", "info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["count"] == 24 and info["resolution"] == 32 and info["class_counts"] == [2] * 12
    assert info["class_names"] == CLASS_NAMES and info["has_captions"] is True and info["size_bytes"] > 24 * 32 * 32 * 3

    # The human-readable table is the result: stdout (reptok data info D | grep images).
    r = runner.invoke(app, ["data", "info", str(out)])
    assert r.exit_code == 0 and "24" in r.stdout and "images" in r.stdout
    r = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert r.exit_code == 2 and "reptok data prep" in r.output
    r = runner.invoke(app, ["data", "prep", "builtin:shapes:3", "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_adm_center_crop_by_hand():
    """64x48 -> 16: one BOX halving (48 >= 32) to 32x24, BICUBIC to round(32 * 16/24) = 21 x 16,
    crop 2 columns off the left: the steps written out with PIL (catches another filter, a
    missing halving, or an off-centre crop)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    half = im.resize((32, 24), resample=Image.BOX)
    want = np.asarray(half.resize((21, 16), resample=Image.BICUBIC))[:, 2:18]
    got = center_crop_arr(im, 16)
    assert got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, want)
