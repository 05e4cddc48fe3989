"""Tests for the synthetic shapes dataset (agvm.data.shapes, agvm.data.register)."""

import ast
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

import agvm  # noqa: F401  (before detectron2)
from agvm.data import shapes

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

T = len(shapes.THING_CLASSES)
S = len(shapes.STUFF_CLASSES)


def _all_files(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _png(path):
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small dataset at the default image size: 40 train + 16 val images."""
    out = str(tmp_path_factory.mktemp("shapes") / "ds")
    return shapes.generate_shapes(out, seed=0, image_size=128, num_train=40, num_val=16)


def test_module_has_no_detectron2_import():
    tree = ast.parse(open(shapes.__file__).read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    assert names and not [n for n in names if n.split(".")[0] == "detectron2"]


def test_constants():
    assert len(shapes.THING_CLASSES) >= 4 and len(shapes.STUFF_CLASSES) >= 2
    assert isinstance(shapes.SHAPES_VERSION, int)
    assert os.path.basename(shapes.shapes_dir("/r", 3, 64, 1000, 200)) == (
        f"shapes_v{shapes.SHAPES_VERSION}_seed3_64px"
    )
    assert os.path.basename(shapes.shapes_dir("/r", 0, 128, 16, 8)).endswith("_n16-8")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))
    assert shapes.default_root() == str(tmp_path)
    monkeypatch.delenv("AGVM_DATASETS")
    assert shapes.default_root() == os.path.expanduser("~/.cache/agvm/datasets")


def test_determinism(tmp_path):
    a = shapes.generate_shapes(str(tmp_path / "a"), seed=0, image_size=128, num_train=12, num_val=6)
    b = shapes.generate_shapes(str(tmp_path / "b"), seed=0, image_size=128, num_train=12, num_val=6)
    c = shapes.generate_shapes(str(tmp_path / "c"), seed=1, image_size=128, num_train=12, num_val=6)
    fa, fb, fc = _all_files(a), _all_files(b), _all_files(c)
    assert len(fa) == 4 * 18 + 4 + 1
    assert fa.keys() == fb.keys() == fc.keys()
    for k in fa:
        assert fa[k] == fb[k], k
    images = [k for k in fa if k.startswith("images")]
    assert all(fa[k] != fc[k] for k in images)
    # train and val come from different streams
    assert fa[os.path.join("images", "train", "000001.png")] != fa[
        os.path.join("images", "val", "000001.png")
    ]


def test_layout_and_manifest(dataset):
    with open(os.path.join(dataset, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["version"] == shapes.SHAPES_VERSION
    assert manifest["seed"] == 0 and manifest["image_size"] == 128
    assert manifest["num_images"] == {"train": 40, "val": 16}
    assert manifest["thing_classes"] == list(shapes.THING_CLASSES)
    assert manifest["stuff_classes"] == list(shapes.STUFF_CLASSES)
    on_disk = set(_all_files(dataset)) - {"manifest.json"}
    assert {k.replace("/", os.sep) for k in manifest["files"]} == on_disk
    for split, n in (("train", 40), ("val", 16)):
        for sub in ("images", "sem_seg", "panoptic", "panoptic_stuff"):
            assert sorted(os.listdir(os.path.join(dataset, sub, split))) == [
                f"{i:06d}.png" for i in range(1, n + 1)
            ]
    img = Image.open(os.path.join(dataset, "images", "val", "000001.png"))
    assert img.mode == "RGB" and img.size == (128, 128)
    assert Image.open(os.path.join(dataset, "sem_seg", "val", "000001.png")).mode == "L"
    assert Image.open(os.path.join(dataset, "panoptic", "val", "000001.png")).mode == "RGB"
    assert Image.open(os.path.join(dataset, "panoptic_stuff", "val", "000001.png")).mode == "L"
    assert shapes.verify_shapes(dataset, seed=0, image_size=128, num_train=40, num_val=16) == []


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_self_evaluation_is_perfect(dataset, split):
    gt = COCO(os.path.join(dataset, "annotations", f"instances_{split}.json"))
    assert sorted(gt.getCatIds()) == list(range(1, T + 1))
    assert len(gt.getImgIds()) == (40 if split == "train" else 16)
    dets_bbox, dets_segm = [], []
    for ann in gt.loadAnns(gt.getAnnIds()):
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
        common = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        dets_bbox.append(dict(common, bbox=list(ann["bbox"])))
        rle = gt.annToRLE(ann)
        dets_segm.append(dict(common, segmentation=rle))
        # area is the rasterised mask's pixel count, bbox its tight box
        m = gt.annToMask(ann)
        assert ann["area"] == int(m.sum()) == int(mask_util.area(rle))
        ys, xs = np.nonzero(m)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == box
    for iou_type, dets in (("bbox", dets_bbox), ("segm", dets_segm)):
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert abs(ev.stats[0] - 1.0) < 1e-6, (iou_type, ev.stats[0])


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_and_semantic_agree_with_instances(dataset, split):
    coco = COCO(os.path.join(dataset, "annotations", f"instances_{split}.json"))
    with open(os.path.join(dataset, "annotations", f"panoptic_{split}.json")) as f:
        pan_json = json.load(f)
    cats = {c["id"]: c for c in pan_json["categories"]}
    assert [c["id"] for c in pan_json["categories"]] == list(range(1, T + S + 1))
    assert [cats[i]["isthing"] for i in sorted(cats)] == [1] * T + [0] * S
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
        i: cats[i]["name"] for i in range(1, T + 1)
    }
    assert len(pan_json["annotations"]) == len(coco.getImgIds())
    for pan_ann in pan_json["annotations"]:
        img_id = pan_ann["image_id"]
        name = coco.loadImgs(img_id)[0]["file_name"]
        assert pan_ann["file_name"] == name
        rgb = _png(os.path.join(dataset, "panoptic", split, name)).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        sem = _png(os.path.join(dataset, "sem_seg", split, name))
        sep = _png(os.path.join(dataset, "panoptic_stuff", split, name))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        inst_masks = [coco.annToMask(a).astype(bool) for a in anns]
        assert 1 <= len(anns) <= 6

        segs = pan_ann["segments_info"]
        assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in segs)  # no void
        things = [s for s in segs if cats[s["category_id"]]["isthing"]]
        assert len(things) == len(anns)
        used = set()
        for s in segs:
            m = ids == s["id"]
            assert s["area"] == int(m.sum()) > 0
            ys, xs = np.nonzero(m)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["bbox"] == box
            if cats[s["category_id"]]["isthing"]:
                matches = [
                    i for i, (a, im) in enumerate(zip(anns, inst_masks))
                    if a["category_id"] == s["category_id"] and np.array_equal(im, m)
                ]
                assert len(matches) == 1
                used.add(matches[0])
                assert s["bbox"] == anns[matches[0]]["bbox"]
            else:
                assert np.all(sem[m] == s["category_id"] - 1)
                assert np.all(sep[m] == s["category_id"] - T)  # stuff -> 1..S
        assert used == set(range(len(anns)))

        thing_px = np.zeros(sem.shape, dtype=bool)
        for a, m in zip(anns, inst_masks):
            assert not (thing_px & m).any()  # instances never overlap
            thing_px |= m
            assert np.all(sem[m] == a["category_id"] - 1)
        assert np.all(sem[~thing_px] >= T) and np.all(sem[~thing_px] < T + S)
        assert np.all(sep[thing_px] == 0)
        assert np.all(sep[~thing_px] == sem[~thing_px] - T + 1)
        assert not (sem == 255).any() and not (sep == 255).any()


def test_statistics(dataset):
    boxes, classes, stuff, counts = [], set(), set(), []
    for split in ("train", "val"):
        coco = COCO(os.path.join(dataset, "annotations", f"instances_{split}.json"))
        for img_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
            counts.append(len(anns))
        for a in coco.loadAnns(coco.getAnnIds()):
            boxes.append(a["bbox"])
            classes.add(a["category_id"])
        for f in os.listdir(os.path.join(dataset, "sem_seg", split)):
            stuff |= set(np.unique(_png(os.path.join(dataset, "sem_seg", split, f))).tolist())
    sides = np.array([max(b[2], b[3]) for b in boxes])
    assert classes == set(range(1, T + 1))
    assert stuff >= set(range(T, T + S))
    assert sides.min() < 20 and sides.max() > 40
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 3
    # image content varies: pixels are not all one colour and images differ
    im1 = _png(os.path.join(dataset, "images", "train", "000001.png"))
    im2 = _png(os.path.join(dataset, "images", "train", "000002.png"))
    assert im1.reshape(-1, 3).std(axis=0).min() > 1 and not np.array_equal(im1, im2)


def test_ensure_repairs_corruption(tmp_path, caplog):
    root = str(tmp_path / "root")
    kw = dict(root=root, seed=0, image_size=128, num_train=10, num_val=4)
    folder = shapes.ensure_shapes(**kw)
    assert folder == shapes.shapes_dir(**kw) and os.path.isdir(folder)
    original = _all_files(folder)
    inode = os.stat(folder).st_ino

    # intact: nothing regenerated (same folder inode), verification ran again
    assert shapes.ensure_shapes(**kw, recheck=True) == folder
    assert os.stat(folder).st_ino == inode

    # flip bytes in one file (same size): only the sha256 can tell
    flip = os.path.join(folder, "annotations", "panoptic_val.json")
    data = bytearray(original[os.path.relpath(flip, folder)])
    data[10] ^= 0xFF
    data[-5] ^= 0x01
    with open(flip, "wb") as f:
        f.write(bytes(data))
    problems = shapes.verify_shapes(folder)
    assert problems == ["annotations/panoptic_val.json has a wrong sha256"]
    # memoised: without recheck the corruption goes unnoticed in this process
    assert shapes.ensure_shapes(**kw) == folder
    assert _all_files(folder) != original
    with caplog.at_level(logging.WARNING, logger=shapes.__name__):
        assert shapes.ensure_shapes(**kw, recheck=True) == folder
    assert any("regenerating" in r.getMessage() for r in caplog.records)
    assert _all_files(folder) == original
    assert not [e for e in os.listdir(root) if ".tmp-" in e or ".old-" in e]

    # truncate one file and flip bytes in another
    trunc = os.path.join(folder, "images", "train", "000003.png")
    with open(trunc, "r+b") as f:
        f.truncate(100)
    with open(flip, "wb") as f:
        f.write(bytes(data))
    assert len(shapes.verify_shapes(folder)) == 2
    assert shapes.ensure_shapes(**kw, recheck=True) == folder
    assert _all_files(folder) == original

    # a deleted file
    os.remove(os.path.join(folder, "sem_seg", "val", "000002.png"))
    assert shapes.ensure_shapes(**kw, recheck=True) == folder
    assert _all_files(folder) == original

    # a different manifest (e.g. other counts) is regenerated too
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["seed"] = 5
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert shapes.ensure_shapes(**kw, recheck=True) == folder
    assert _all_files(folder) == original


def test_ensure_uses_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))
    monkeypatch.setenv("AGVM_SHAPES_NUM_TRAIN", "3")
    monkeypatch.setenv("AGVM_SHAPES_NUM_VAL", "2")
    folder = shapes.ensure_shapes()
    assert os.path.dirname(folder) == str(tmp_path)
    assert len(os.listdir(os.path.join(folder, "images", "train"))) == 3
    assert len(os.listdir(os.path.join(folder, "images", "val"))) == 2


@pytest.fixture
def registered(monkeypatch, tmp_path):
    d2 = pytest.importorskip("detectron2")  # noqa: F841
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from agvm.data import register

    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))
    monkeypatch.setenv("AGVM_SHAPES_NUM_TRAIN", "6")
    monkeypatch.setenv("AGVM_SHAPES_NUM_VAL", "5")
    prefix = "shapes_regtest"
    names = register.register_shapes(prefix=prefix)
    yield register, prefix, names
    for n in names:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        if n in MetadataCatalog.list():
            MetadataCatalog.remove(n)
        register._REGISTERED.pop(n, None)


def test_register(registered, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register, p, names = registered
    expected = []
    for split in ("train", "val"):
        expected += [f"{p}_{split}", f"{p}_{split}_sem_seg", f"{p}_{split}_panoptic",
                     f"{p}_{split}_panoptic_separated", f"{p}_{split}_panoptic_stuffonly"]
    assert sorted(names) == sorted(expected)
    assert all(n in DatasetCatalog.list() for n in names)
    # lazy: nothing generated at registration
    assert os.listdir(tmp_path) == []
    # idempotent
    assert register.register_shapes(prefix=p) == names
    # default names are registered on import
    assert {"shapes_train", "shapes_val_panoptic_separated"} <= set(DatasetCatalog.list())

    folder = shapes.shapes_dir(str(tmp_path), 0, 128, 6, 5)
    meta = MetadataCatalog.get(f"{p}_val")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == list(shapes.THING_CLASSES) and len(meta.thing_colors) == T
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(T)}
    assert meta.json_file == os.path.join(folder, "annotations", "instances_val.json")
    assert meta.image_root == os.path.join(folder, "images", "val")

    dicts = DatasetCatalog.get(f"{p}_val")
    assert len(dicts) == 5 and os.path.isfile(meta.json_file)
    assert all(os.path.isfile(d["file_name"]) and d["annotations"] for d in dicts)
    a = dicts[0]["annotations"][0]
    assert len(a["bbox"]) == 4 and a["segmentation"] and 0 <= a["category_id"] < T

    sem_meta = MetadataCatalog.get(f"{p}_val_sem_seg")
    assert sem_meta.evaluator_type == "sem_seg" and sem_meta.ignore_label == 255
    assert sem_meta.stuff_classes == list(shapes.THING_CLASSES + shapes.STUFF_CLASSES)
    assert sem_meta.sem_seg_root == os.path.join(folder, "sem_seg", "val")
    sem_dicts = DatasetCatalog.get(f"{p}_val_sem_seg")
    assert len(sem_dicts) == 5
    assert all(os.path.isfile(d["sem_seg_file_name"]) for d in sem_dicts)
    assert [os.path.basename(d["file_name"]) for d in sem_dicts] == [
        os.path.basename(d["sem_seg_file_name"]) for d in sem_dicts
    ]

    sep_meta = MetadataCatalog.get(f"{p}_val_panoptic_separated")
    assert sep_meta.evaluator_type == "coco_panoptic_seg"
    assert sep_meta.stuff_classes == ["things"] + list(shapes.STUFF_CLASSES)
    stuff_map = {0: 0, **{T + j + 1: j + 1 for j in range(S)}}
    assert sep_meta.stuff_dataset_id_to_contiguous_id == stuff_map
    assert sep_meta.sem_seg_root == os.path.join(folder, "panoptic_stuff", "val")
    for key in ("panoptic_root", "panoptic_json", "json_file", "image_root"):
        assert os.path.exists(getattr(sep_meta, key)), key
    sep = DatasetCatalog.get(f"{p}_val_panoptic_separated")
    assert len(sep) == 5
    assert all(d["annotations"] and d["sem_seg_file_name"].endswith(".png") for d in sep)
    assert len(DatasetCatalog.get(f"{p}_val_panoptic_stuffonly")) == 5

    pan_meta = MetadataCatalog.get(f"{p}_val_panoptic")
    assert pan_meta.evaluator_type == "coco_panoptic_seg" and pan_meta.label_divisor == 1000
    assert pan_meta.stuff_dataset_id_to_contiguous_id == {T + j + 1: T + j for j in range(S)}
    pan = DatasetCatalog.get(f"{p}_val_panoptic")
    assert len(pan) == 5 and all(os.path.isfile(d["pan_seg_file_name"]) for d in pan)
    infos = [s for d in pan for s in d["segments_info"]]
    assert {s["isthing"] for s in infos} == {True, False}
    assert all(0 <= s["category_id"] < T + S for s in infos)

    from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator

    COCOEvaluator(f"{p}_val", output_dir=str(tmp_path / "eval"))
    SemSegEvaluator(f"{p}_val_sem_seg")
    SemSegEvaluator(f"{p}_val_panoptic_separated")
    COCOPanopticEvaluator(f"{p}_val_panoptic")


def test_prepare_datasets(registered, tmp_path):
    register, p, _ = registered
    assert register.prepare_datasets(["coco_2017_val"]) == []
    assert os.listdir(tmp_path) == []
    folders = register.prepare_datasets([f"{p}_train", f"{p}_val_panoptic_separated"])
    assert folders == [shapes.shapes_dir(str(tmp_path), 0, 128, 6, 5)]
    assert shapes.verify_shapes(folders[0]) == []


def test_register_follows_environment(registered, monkeypatch, tmp_path):
    from detectron2.data import MetadataCatalog

    register, p, _ = registered
    other = tmp_path / "other"
    monkeypatch.setenv("AGVM_DATASETS", str(other))
    register.register_shapes(prefix=p)  # same names, new root: replaced
    assert MetadataCatalog.get(f"{p}_val").json_file.startswith(str(other))
    assert register.registered_config(f"{p}_val")["root"] == str(other)


_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import agvm
from agvm.data import shapes
shapes.ensure_shapes(sys.argv[1], seed=0, image_size=128, num_train=60, num_val=10)
"""


@pytest.mark.ddp
def test_concurrent_processes_generate_once(tmp_path):
    import subprocess
    import sys

    root = str(tmp_path / "root")
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, root], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("shapes: generated" in o for o in outs) == 1, outs
    folder = shapes.shapes_dir(root, 0, 128, 60, 10)
    assert shapes.verify_shapes(folder) == []
    name = os.path.basename(folder)
    assert sorted(os.listdir(root)) == sorted([name, f".{name}.lock"])


@pytest.mark.slow
def test_default_size_generation(tmp_path):
    """The default dataset (1000 + 200 images, 128 px); ~10 s on 2 cores (not asserted)."""
    import time

    t0 = time.perf_counter()
    folder = shapes.ensure_shapes(str(tmp_path))
    print(f"generated the default shapes dataset in {time.perf_counter() - t0:.1f} s")
    coco = COCO(os.path.join(folder, "annotations", "instances_train.json"))
    assert len(coco.getImgIds()) == 1000
    sides = np.array([max(a["bbox"][2:]) for a in coco.loadAnns(coco.getAnnIds())])
    assert sides.min() < 20 and sides.max() > 40
    cats = [a["category_id"] for a in coco.loadAnns(coco.getAnnIds())]
    assert set(cats) == set(range(1, T + 1))
