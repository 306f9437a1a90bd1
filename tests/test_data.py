"""Dataset layouts: exact sample counts, labels, mask pairing, defect types, errors."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from synth import (
    make_btad_tree,
    make_folder_tree,
    make_manifest,
    make_mvtec_tree,
    make_visa_tree,
    normal_image,
    write_image,
)

from pyimgano_core.data import (
    MVTecConfig,
    Sample,
    describe,
    load_splits,
    parse_dataset_config,
    read_mask,
)
from pyimgano_core.errors import ConfigError, DataError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"


def by_defect(samples):
    out: dict[str, int] = {}
    for s in samples:
        out[s.defect_type] = out.get(s.defect_type, 0) + 1
    return out


def mvtec(root, **kw):
    return load_splits({"type": "mvtec_ad", "root": str(root), "category": "widget", **kw})


# ------------------------------------------------------------------- MVTec AD


def test_synth_mvtec_tree_is_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    make_mvtec_tree(tmp_path / "a")
    assert time.perf_counter() - t0 < 0.2
    make_mvtec_tree(tmp_path / "b")
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)


def test_mvtec_counts_labels_masks(tmp_path):
    root = make_mvtec_tree(tmp_path)
    [split] = mvtec(root)
    assert split.name == "widget" and split.mask_threshold == 127
    assert len(split.train) == 8 and all(
        s.label == 0 and s.defect_type == "good" for s in split.train
    )
    assert by_defect(split.test) == {"good": 3, "scratch": 3, "dent": 2}
    for s in split.test:
        if s.label == 0:
            assert s.defect_type == "good" and s.mask_path is None
        else:
            assert (
                s.mask_path
                == root / "widget" / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
            )
            assert read_mask(s.mask_path, 127).sum() > 0
    assert [str(s.path) for s in split.test] == sorted(str(s.path) for s in split.test)
    assert all(s.path.is_absolute() for s in split.train + split.test)
    assert split.notes["warnings"] == [] and split.notes["root"] == (root / "widget").as_posix()


def test_mvtec_relative_root_resolves_against_cwd(tmp_path, monkeypatch):
    make_mvtec_tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    [split] = load_splits(MVTecConfig(root="data", category="widget"))
    assert split.train[0].path == tmp_path / "data" / "widget" / "train" / "good" / "000.png"


def test_mvtec_all_and_list_sorted(tmp_path):
    make_mvtec_tree(tmp_path, category="zeta")
    make_mvtec_tree(tmp_path, category="alpha", n_train=4)
    (tmp_path / "license_stuff").mkdir()  # not a category: no train/ and test/
    splits = load_splits({"type": "mvtec_ad", "root": str(tmp_path), "category": "all"})
    assert [s.name for s in splits] == ["alpha", "zeta"]
    assert [len(s.train) for s in splits] == [4, 8]
    splits = load_splits({"type": "mvtec_ad", "root": str(tmp_path), "category": ["zeta", "alpha"]})
    assert [s.name for s in splits] == ["alpha", "zeta"]


def test_mvtec_missing_category_lists_available(tmp_path):
    make_mvtec_tree(tmp_path)
    with pytest.raises(DataError, match=r"category 'botle' not found under .*available: widget"):
        load_splits({"type": "mvtec_ad", "root": str(tmp_path), "category": "botle"})
    with pytest.raises(DataError, match=r"root .*nowhere does not exist"):
        load_splits({"type": "mvtec_ad", "root": str(tmp_path / "nowhere"), "category": "x"})
    with pytest.raises(DataError, match="use its parent"):
        load_splits({"type": "mvtec_ad", "root": str(tmp_path / "widget"), "category": "widget"})


def test_mvtec_missing_train_folder(tmp_path):
    root = make_mvtec_tree(tmp_path)
    shutil.rmtree(root / "widget" / "train" / "good")
    with pytest.raises(DataError, match=r"training folder .*widget/train/good does not exist"):
        mvtec(root)


def test_mvtec_missing_mask_error_and_exclude(tmp_path):
    root = make_mvtec_tree(tmp_path)
    (root / "widget" / "ground_truth" / "dent" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"no mask for defective image .*test/dent/001.png"):
        mvtec(root)
    [split] = mvtec(root, missing_mask="exclude")
    [s] = [s for s in split.test if s.mask_path is None and s.label == 1]
    assert s.path.name == "001.png" and s.defect_type == "dent" and not s.has_pixel_gt
    assert split.notes["missing_masks"] == ["test/dent/001.png"]
    assert describe(split)["masks"] == {"found": 4, "missing": 1, "empty": 0}


def test_mvtec_mask_without_image(tmp_path):
    root = make_mvtec_tree(tmp_path)
    gt = root / "widget" / "ground_truth"
    shutil.copy(gt / "dent" / "000_mask.png", gt / "dent" / "007_mask.png")
    with pytest.raises(DataError, match=r"mask .*dent/007_mask.png matches no image"):
        mvtec(root)
    (gt / "dent" / "007_mask.png").unlink()
    shutil.copytree(gt / "dent", gt / "crack")  # defect with masks but no test folder
    with pytest.raises(DataError, match=r"crack/000_mask.png matches no image"):
        mvtec(root)


def test_mvtec_mask_size_mismatch_names_both(tmp_path):
    root = make_mvtec_tree(tmp_path)
    write_image(
        root / "widget" / "ground_truth" / "scratch" / "002_mask.png", np.zeros((32, 64), np.uint8)
    )
    with pytest.raises(
        DataError, match=r"mask .*002_mask.png is 32x64 .* image .*scratch/002.png is 64x64"
    ):
        mvtec(root)


def test_mvtec_duplicate_stems(tmp_path):
    root = make_mvtec_tree(tmp_path)
    write_image(
        root / "widget" / "train" / "good" / "003.jpg",
        normal_image(np.random.default_rng(0), (64, 64)),
    )
    with pytest.raises(DataError, match=r"duplicate training image stem: .*003.jpg and .*003.png"):
        mvtec(root)


def test_mvtec_empty_splits(tmp_path):
    root = make_mvtec_tree(tmp_path, n_train=0)
    (root / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no training images in .*train/good"):
        mvtec(root)
    root = make_mvtec_tree(tmp_path / "b", n_test_good=0, defects={})
    (root / "widget" / "test").mkdir()
    with pytest.raises(DataError, match=r"no test images in .*widget/test"):
        mvtec(root)


def test_mvtec_empty_mask_kept_and_noted(tmp_path):
    root = make_mvtec_tree(tmp_path)
    write_image(
        root / "widget" / "ground_truth" / "dent" / "000_mask.png", np.zeros((64, 64), np.uint8)
    )
    [split] = mvtec(root)
    assert len(split.test) == 8
    assert split.notes["empty_masks"] == ["test/dent/000.png"]
    assert "empty mask" in split.notes["warnings"][0]
    assert describe(split)["masks"] == {"found": 5, "missing": 0, "empty": 1}


def test_config_validation_errors():
    with pytest.raises(ValidationError, match="categry"):
        parse_dataset_config({"type": "mvtec_ad", "root": "x", "categry": "bottle"})
    with pytest.raises(ValidationError, match="mvtec_ad"):
        parse_dataset_config({"type": "mvtec", "root": "x"})
    with pytest.raises(ValidationError, match="missing_mask"):
        parse_dataset_config({"type": "mvtec_ad", "root": "x", "missing_mask": "skip"})
    with pytest.raises(ValidationError, match="ratio"):
        parse_dataset_config({"type": "mvtec_ad", "root": "x", "contamination": {"ratio": -0.1}})


# ----------------------------------------------------------------------- VisA


def test_visa_official_two_categories(tmp_path):
    make_visa_tree(tmp_path, "candle", mask_value=1)  # VisA marks defects with small values
    make_visa_tree(tmp_path, "pcb1", n_train=4, n_bad=2, seed=1)
    splits = load_splits({"type": "visa", "root": str(tmp_path), "category": "all"})
    assert [s.name for s in splits] == ["candle", "pcb1"]
    candle, pcb1 = splits
    assert candle.mask_threshold == 0 and candle.notes["layout"] == "official"
    assert len(candle.train) == 6 and by_defect(candle.test) == {"good": 2, "bad": 3}
    assert len(pcb1.train) == 4 and by_defect(pcb1.test) == {"good": 2, "bad": 2}
    for s in candle.test:
        if s.label:
            assert (
                s.mask_path
                == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / f"{s.path.stem}.png"
            )
    assert "empty_masks" not in candle.notes  # value-1 masks count at threshold 0
    [again] = load_splits(
        {"type": "visa", "root": str(tmp_path), "category": "candle", "mask_threshold": 1}
    )
    assert len(again.notes["empty_masks"]) == 3


def test_visa_preprocessed_and_auto(tmp_path):
    make_visa_tree(tmp_path, "candle", layout="preprocessed")
    make_visa_tree(tmp_path, "pcb1", layout="official")
    candle, pcb1 = load_splits({"type": "visa", "root": str(tmp_path)})
    assert candle.notes["layout"] == "preprocessed" and pcb1.notes["layout"] == "official"
    assert len(candle.train) == 6 and by_defect(candle.test) == {"good": 2, "bad": 3}
    bad = [s for s in candle.test if s.label == 1]
    assert [s.mask_path.name for s in bad] == ["000.png", "001.png", "002.png"]
    only = load_splits(
        {"type": "visa", "root": str(tmp_path), "layout": "preprocessed", "category": "all"}
    )
    assert [s.name for s in only] == ["candle"]
    with pytest.raises(DataError, match="neither Data/"):
        load_splits({"type": "visa", "root": str(tmp_path), "category": "split_csv"})


def test_visa_official_errors(tmp_path):
    make_visa_tree(tmp_path, "candle")
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Normal/0003.JPG", "Normal/9999.JPG"))
    with pytest.raises(DataError, match=r"1cls.csv line 5: image .*9999.JPG does not exist"):
        load_splits({"type": "visa", "root": str(tmp_path), "category": "candle"})
    csv_path.write_text(text.replace("candle,", "capsules,"))
    with pytest.raises(DataError, match="no rows for object 'candle'"):
        load_splits({"type": "visa", "root": str(tmp_path), "category": "candle"})
    csv_path.unlink()
    with pytest.raises(DataError, match=r"split file .*1cls.csv does not exist"):
        load_splits({"type": "visa", "root": str(tmp_path), "category": "candle"})


# ----------------------------------------------------------------------- BTAD


def test_btad_png_and_bmp_masks(tmp_path):
    make_btad_tree(tmp_path, "01", mask_ext="mixed")
    make_btad_tree(tmp_path, "03", n_ko=2, mask_ext=".bmp", image_ext=".png")
    splits = load_splits({"type": "btad", "root": str(tmp_path), "category": [1, "03"]})
    assert [s.name for s in splits] == ["01", "03"]
    s01, s03 = splits
    assert len(s01.train) == 6 and by_defect(s01.test) == {"good": 2, "ko": 4}
    assert sorted(s.mask_path.name for s in s01.test if s.label) == [
        "0000.png",
        "0001.bmp",
        "0002.png",
        "0003.bmp",
    ]
    assert by_defect(s03.test) == {"good": 2, "ko": 2}
    assert parse_dataset_config({"type": "btad", "root": "x", "category": 2}).category == "02"


def test_btad_ambiguous_mask(tmp_path):
    make_btad_tree(tmp_path, "02", mask_ext=".png")
    gt = tmp_path / "02" / "ground_truth" / "ko"
    shutil.copy(gt / "0001.png", gt / "0001.bmp")
    with pytest.raises(
        DataError, match=r"ambiguous masks for .*0001.bmp: .*0001.png and .*0001.bmp"
    ):
        load_splits({"type": "btad", "root": str(tmp_path), "category": "02"})


# ------------------------------------------------------------------- manifest


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_csv_and_jsonl(tmp_path, fmt, monkeypatch):
    path = make_manifest(tmp_path, fmt=fmt)
    monkeypatch.chdir(tmp_path)
    [split] = load_splits({"type": "manifest", "path": path.name})
    assert split.name == "parts"
    assert len(split.train) == 5 and by_defect(split.test) == {"good": 2, "scratch": 3, "dent": 2}
    for s in split.test:
        if s.label:
            assert s.mask_path == tmp_path / "masks" / f"{s.path.stem}.png"
        else:
            assert s.mask_path is None
    [named] = load_splits({"type": "manifest", "path": str(path), "category": "line3"})
    assert named.name == "line3"


def _write_csv(path, rows, header=("image", "split", "label", "mask")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_manifest_errors_name_line(tmp_path):
    path = make_manifest(tmp_path)
    rows = list(csv.reader(open(path)))
    header, body = rows[0], rows[1:]

    def load(body, header=header):
        _write_csv(tmp_path / "m.csv", body, header)
        return load_splits({"type": "manifest", "path": str(tmp_path / "m.csv")})

    with pytest.raises(DataError, match=r"m.csv line 3: image .*nope.png does not exist"):
        load(body[:1] + [["images/nope.png", "train", "ok", "", ""]] + body[1:])
    with pytest.raises(DataError, match=r"m.csv lines 2 and 14 both list image .*000.png"):
        load(body + [body[0]])
    with pytest.raises(DataError, match=r"line 2: label 'maybe'"):
        load([[body[0][0], "train", "maybe", "", ""]] + body[1:])
    with pytest.raises(DataError, match=r"line 2: split 'val'"):
        load([[body[0][0], "val", "normal", "", ""]] + body[1:])
    with pytest.raises(DataError, match="unknown column 'mask_path'"):
        load(body, ["image", "split", "label", "mask_path", "defect_type"])
    no_mask = [r[:3] + ["", r[4]] if r[2] == "anomaly" and r[4] == "dent" else r for r in body]
    with pytest.raises(DataError, match=r"line 12: defective image .*dent_000.png has no mask"):
        load(no_mask)
    _write_csv(tmp_path / "m.csv", no_mask, header)
    [split] = load_splits(
        {"type": "manifest", "path": str(tmp_path / "m.csv"), "missing_mask": "exclude"}
    )
    assert describe(split)["masks"] == {"found": 3, "missing": 2, "empty": 0}


def test_manifest_labels_and_jsonl_errors(tmp_path):
    make_manifest(tmp_path)
    rows = [
        ["images/train/000.png", "train", "0"],
        ["images/train/001.png", "train", "OK"],
        ["images/test/good_000.png", "test", "good"],
        ["images/test/scratch_000.png", "test", "NG"],
        ["images/test/scratch_001.png", "test", "1"],
        ["images/test/scratch_002.png", "test", "bad"],
    ]
    _write_csv(tmp_path / "m.csv", rows, ("image", "split", "label"))
    [split] = load_splits(
        {"type": "manifest", "path": str(tmp_path / "m.csv"), "missing_mask": "exclude"}
    )
    assert [s.label for s in split.train] == [0, 0]
    assert [(s.label, s.defect_type) for s in split.test] == [(0, "good")] + [(1, "defect")] * 3
    _write_csv(
        tmp_path / "m.csv",
        [rows[0] + ["scratch"]] + rows[1:],
        ("image", "split", "label", "defect_type"),
    )
    with pytest.raises(DataError, match=r"m.csv line 2: normal image has defect_type 'scratch'"):
        load_splits({"type": "manifest", "path": str(tmp_path / "m.csv")})
    (tmp_path / "j.jsonl").write_text(
        json.dumps({"image": "a.png", "split": "train", "label": 0}) + "\n{oops\n"
    )
    with pytest.raises(DataError, match=r"j.jsonl line 2: invalid JSON"):
        load_splits({"type": "manifest", "path": str(tmp_path / "j.jsonl")})


# ---------------------------------------------------------------- folder spec

MT_SPEC = {
    "type": "folder",
    "train": "MT_Free/Imgs/*.jpg",
    "test_fraction": 0.3,
    "test_anomalous": ["MT_Blowhole/Imgs/*.jpg", "MT_Crack/Imgs/*.jpg"],
    "defect_type": "grandparent",
    "mask": {"mode": "same_folder_ext", "ext": ".png"},
}


def test_folder_spec_magnetic_like(tmp_path):
    root = make_folder_tree(tmp_path / "mt")
    [split] = load_splits({**MT_SPEC, "root": str(root)})
    assert split.name == "mt"
    assert len(split.train) == 7 and by_defect(split.test) == {
        "good": 3,
        "MT_Blowhole": 3,
        "MT_Crack": 2,
    }
    for s in split.test:
        if s.label:
            assert s.mask_path == s.path.with_suffix(".png")
    assert split.notes["empty_masks"] == ["MT_Crack/Imgs/mt_crack_001.jpg"]
    assert split.notes["holdout"] == {"test_fraction": 0.3, "seed": 0, "n_test_normal": 3}
    d = describe(split)
    assert d["masks"] == {"found": 5, "missing": 0, "empty": 1}
    assert json.loads(json.dumps(d)) == d and json.dumps(split.notes)
    assert d["image_size"]["height"][0] >= 40 and d["image_size"]["width"][1] <= 60


def test_folder_holdout_is_seeded(tmp_path):
    root = make_folder_tree(tmp_path, n_free=30)
    pick = lambda seed: [  # noqa: E731
        s.path.name
        for s in load_splits({**MT_SPEC, "root": str(root), "seed": seed})[0].test
        if s.label == 0
    ]
    assert pick(0) == pick(0) and len(pick(0)) == 9
    assert pick(0) != pick(1)


def test_folder_spec_errors(tmp_path):
    root = make_folder_tree(tmp_path)
    spec = {**MT_SPEC, "root": str(root)}
    with pytest.raises(
        DataError, match=r"duplicate training image stem: .*free_000.jpg and .*free_000.png"
    ):
        load_splits({**spec, "train": "MT_Free/Imgs/*"})  # the masks match too
    with pytest.raises(DataError, match=r"glob 'MT_Fre/Imgs/\*.jpg' matches no image"):
        load_splits({**spec, "train": "MT_Fre/Imgs/*.jpg"})
    with pytest.raises(
        DataError, match=r"matched by both dataset.train and dataset.test_anomalous"
    ):
        load_splits({**spec, "train": "MT_*/Imgs/*.jpg"})
    with pytest.raises(DataError, match=r"is selected as an image but is the mask of"):
        load_splits({**spec, "test_anomalous": "MT_Crack/Imgs/*"})
    with pytest.raises(ValidationError, match="either test_normal or test_fraction"):
        parse_dataset_config({**spec, "test_normal": "MT_Free/Imgs/*.jpg"})
    with pytest.raises(ValidationError, match="mask.dir is required"):
        parse_dataset_config({**spec, "mask": {"mode": "mask_dir"}})
    (root / "MT_Blowhole" / "Imgs" / "mt_blowhole_001.png").unlink()
    with pytest.raises(DataError, match=r"no mask for defective image .*mt_blowhole_001.jpg"):
        load_splits(spec)
    [split] = load_splits({**spec, "missing_mask": "exclude"})
    assert split.notes["missing_masks"] == ["MT_Blowhole/Imgs/mt_blowhole_001.jpg"]


def test_folder_mask_dir_regex_and_test_normal(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(tmp_path / "ok" / f"a{i}.png", normal_image(rng, (32, 32)))
    write_image(tmp_path / "ok_test" / "b0.png", normal_image(rng, (32, 32)))
    for kind in ("lot1_crack", "lot2_stain"):
        write_image(tmp_path / "ng" / kind / "c0.png", normal_image(rng, (32, 32)))
        mask = np.zeros((32, 32), np.uint8)
        mask[4:9, 4:9] = 255
        write_image(tmp_path / "labels" / kind.split("_")[1] / "c0_mask.png", mask)
    spec = {
        "type": "folder",
        "root": str(tmp_path),
        "category": "custom",
        "train": "ok/*.png",
        "test_normal": ["ok_test/*.png"],
        "test_anomalous": "ng/**/*.png",
        "defect_regex": r"ng/lot\d_(?P<defect>\w+)/",
        "mask": {"mode": "mask_dir", "dir": "labels/{defect}"},
    }
    [split] = load_splits(spec)
    assert split.name == "custom" and len(split.train) == 4
    assert by_defect(split.test) == {"good": 1, "crack": 1, "stain": 1}
    assert {s.mask_path for s in split.test if s.label} == {
        tmp_path / "labels" / "crack" / "c0_mask.png",
        tmp_path / "labels" / "stain" / "c0_mask.png",
    }
    [fixed] = load_splits(
        {
            **spec,
            "defect_regex": None,
            "defect_type": "flaw",
            "mask": None,
            "missing_mask": "exclude",
        }
    )
    assert by_defect(fixed.test) == {"good": 1, "flaw": 2}
    with pytest.raises(ValidationError, match="placeholder"):
        parse_dataset_config({**spec, "mask": {"mode": "mask_dir", "dir": "labels/{kind}"}})


# --------------------------------------------------------------- contamination


def test_contamination_moves_seeded_sample(tmp_path):
    root = make_mvtec_tree(tmp_path, n_train=20, defects={"scratch": 6, "dent": 6})
    cfg = {"contamination": {"ratio": 0.25, "seed": 3}}
    [split] = mvtec(root, **cfg)
    moved = split.notes["contamination"]["moved"]
    assert split.notes["contamination"] == {
        "ratio": 0.25,
        "seed": 3,
        "overlap": False,
        "moved": moved,
    }
    assert len(moved) == 5 and len(split.train) == 25 and len(split.test) == 3 + 12 - 5
    assert sum(s.label for s in split.train) == 5
    train_bad = sorted(s.path for s in split.train if s.label == 1)
    assert train_bad == sorted(root / "widget" / m for m in moved)
    assert all(s.mask_path is not None for s in split.train if s.label == 1)  # Samples kept whole
    assert not {s.path for s in split.test} & set(train_bad)
    assert json.loads(json.dumps(split.notes))["contamination"]["moved"] == moved
    assert mvtec(root, **cfg)[0].notes["contamination"]["moved"] == moved
    assert (
        mvtec(root, contamination={"ratio": 0.25, "seed": 4})[0].notes["contamination"]["moved"]
        != moved
    )
    assert describe(split)["train"] == {"total": 25, "normal": 20, "anomalous": 5,
                                        "by_defect": by_defect(split.train)}  # fmt: skip


def test_contamination_overlap_and_limits(tmp_path):
    root = make_mvtec_tree(tmp_path, n_train=10)
    [split] = mvtec(root, contamination={"ratio": 0.3, "overlap": True})
    assert len(split.train) == 13 and len(split.test) == 8
    assert {s.path for s in split.train if s.label} <= {s.path for s in split.test}
    [split] = mvtec(root, contamination={"ratio": 0.0})
    assert split.notes["contamination"]["moved"] == [] and len(split.train) == 10
    with pytest.raises(
        ConfigError, match=r"ratio=0.6 needs 6 defective images but category widget has only 5"
    ):
        mvtec(root, contamination={"ratio": 0.6})


def test_contamination_with_folder_spec(tmp_path):
    root = make_folder_tree(tmp_path, n_free=20)
    [split] = load_splits({**MT_SPEC, "root": str(root), "contamination": {"ratio": 0.2}})
    assert len(split.train) == 14 + 2 and split.notes["contamination"]["moved"][0].startswith("MT_")


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
@pytest.mark.skipif(
    not (SHARED / "mvtec_ad" / "bottle").is_dir(), reason="../shared/data/mvtec_ad absent"
)
def test_real_mvtec_bottle():
    [split] = load_splits(
        {"type": "mvtec_ad", "root": str(SHARED / "mvtec_ad"), "category": "bottle"}
    )
    assert len(split.train) == 209
    assert by_defect(split.test) == {
        "good": 20,
        "broken_large": 20,
        "broken_small": 22,
        "contamination": 21,
    }
    assert sum(s.mask_path is not None for s in split.test) == 63
    assert split.notes["warnings"] == []


@pytest.mark.realdata
@pytest.mark.skipif(
    not (SHARED / "magnetic_tile").is_dir(), reason="../shared/data/magnetic_tile absent"
)
def test_real_magnetic_tile_folder_spec():
    spec = {
        "type": "folder",
        "root": str(SHARED / "magnetic_tile"),
        "train": "MT_Free/Imgs/*.jpg",
        "test_fraction": 0.2,
        "test_anomalous": [
            f"MT_{d}/Imgs/*.jpg" for d in ("Blowhole", "Break", "Crack", "Fray", "Uneven")
        ],
        "defect_type": "grandparent",
        "mask": {"mode": "same_folder_ext", "ext": ".png"},
        "mask_threshold": 127,
    }
    [split] = load_splits(spec)
    assert len(split.train) + sum(s.label == 0 for s in split.test) == 952
    assert by_defect(split.test) == {
        "good": 190,
        "MT_Blowhole": 115,
        "MT_Break": 85,
        "MT_Crack": 57,
        "MT_Fray": 32,
        "MT_Uneven": 103,
    }
    assert all(s.mask_path is not None for s in split.test if s.label)
    assert len(split.notes["empty_masks"]) == 4
    assert all(p.startswith("MT_Uneven/") for p in split.notes["empty_masks"])
    assert all(isinstance(s, Sample) for s in split.test)
