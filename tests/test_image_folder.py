"""The user's own images: a folder with one sub-folder of PNG files per class, written by the test. `lifelong shards
build` turns it into named domains, a pipeline builds its domains from it through `source: {kind: image_folder}` and
runs class-IL, and bad images or class names are refused with one error line naming them, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.small_stream import run_is_refused, write_pipeline

CLASSES = ("bag", "coat", "dress", "shirt")


def lifelong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def write_images(folder: Path, per_class: int = 40, split: bool = False) -> Path:
    """PNG images of four classes (a bright bar at a class-dependent row on noise), of two sizes (the reader
    resizes), either in one folder per class or in the user's own train/ and test/ folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            side = 12 if i % 2 else 16
            pixels = rng.integers(0, 70, size=(side, side)).astype(np.uint8)
            row = (2 + 3 * label) * side // 16
            pixels[row:row + max(1, side // 8), :] = 250
            where = folder / ("test" if i % 4 == 0 else "train") / name if split else folder / name
            where.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(where / f"{name}-{i:03d}.png")
    return folder


def pipeline(tmp_path: Path, images: Path, **source: object) -> Path:
    common = {"kind": "image_folder", "path": str(images), "image_size": [8, 8], **source}
    return write_pipeline(tmp_path, [{"name": "bags-coats", "source": {**common, "classes": ["bag", "coat"]}},
                                     {"name": "dresses-shirts", "source": {**common, "classes": ["dress", "shirt"]}}],
                          epochs=4)


def test_shards_build_names_the_domains_and_keeps_the_class_names(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", split=True)
    proc = lifelong("shards", "build", "--dataset", "image_folder", "--path", str(images), "--out",
                    str(tmp_path / "out"), "--image-size", "8", "8", "--domain", "first=bag,coat",
                    "--domain", "second=dress,shirt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "out" / "first" / "manifest.json").read_text())
    second = json.loads((tmp_path / "out" / "second" / "manifest.json").read_text())
    assert first["label_set"] == [0, 1] and first["label_names"] == {"0": "bag", "1": "coat"}
    assert second["label_set"] == [2, 3] and second["label_names"] == {"2": "dress", "3": "shirt"}
    assert first["schema"]["features"]["shape"] == [1, 8, 8]
    # The user's own split: every 4th image of a class is test (10 of 40), the rest train (+ val carved from it).
    assert first["splits"]["test"]["rows"] == 20 and first["splits"]["train"]["rows"] + \
        first["splits"]["val"]["rows"] == 60
    verify = lifelong("shards", "verify", str(tmp_path / "out" / "first"), cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.e2e
def test_an_image_folder_stream_runs_class_il(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images")
    proc = lifelong("run", str(pipeline(tmp_path, images)), "--json", "--no-progress", "--workdir",
                    str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["domains"] == ["bags-coats", "dresses-shirts"]
    assert report["R"][0][0] > 0.9 and report["R"][1][1] > 0.9
    manifest = json.loads((tmp_path / "w" / "shards" / "p" / "bags-coats" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["rows"] == 16  # 20% of each class's 40 images, seeded


@pytest.mark.parametrize("spoil, culprits", [
    ("unreadable", ["unreadable image", "coat-007.png"]),
    ("unknown class", ["source.classes", "no class folder 'coats'"]),
])
def test_bad_images_and_classes_are_refused(tmp_path: Path, spoil: str, culprits: list[str]) -> None:
    images = write_images(tmp_path / "images", per_class=8)
    path = pipeline(tmp_path, images)
    if spoil == "unreadable":
        (images / "coat" / "coat-007.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
        spec = yaml.safe_load(path.read_text())
        spec["domains"][0]["source"]["classes"] = ["bag", "coats"]
        path.write_text(yaml.safe_dump(spec))
    proc = lifelong("run", str(path), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    run_is_refused(proc, culprits, tmp_path / "w", "p")
