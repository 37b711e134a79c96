"""`vit inspect`: a tiny checkpoint in, the paper's analysis figures, their numbers and one self-contained page out."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import vit
from pipelines.cli import main
from pipelines.evaluation.inspect import FIGURES, find_evaluation_set, load_inspected_model

TINY = dict(img_size=32, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, num_classes=5)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """A tiny model on a shared 2-core machine: intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    vit.save_checkpoint(vit.VisionTransformer(vit.ViTConfig(**{**TINY, **overrides})), folder / "model.safetensors")
    return folder


def _inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


CLASSES = ["cat", "dog", "eel", "fox", "gnu"]


def _shards(root: Path, splits: dict[str, list[list[int]]]) -> Path:
    """A `vit shard` output with single-label png samples: per split, its shards' label ids in order. Keys
    ``{split}{i:03d}``, numbered over all splits."""
    root.mkdir(parents=True)
    info = {"name": root.name, "num_classes": len(CLASSES), "multi_label": False, "splits": {}}
    index = 0
    for split, shards in splits.items():
        names = []
        for number, labels in enumerate(shards):
            names.append(f"{split}-{number:06d}.tar")
            with tarfile.open(root / names[-1], "w") as tar:
                for label in labels:
                    png = io.BytesIO()
                    Image.new("RGB", (40, 36), (index * 7 % 256, 80, 160)).save(png, format="PNG")
                    for ext, data in (("png", png.getvalue()), ("cls", str(label).encode())):
                        member = tarfile.TarInfo(f"{split}{index:03d}.{ext}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
                    index += 1
        lengths = [len(labels) for labels in shards]
        info["splits"][split] = {
            "name": split,
            "num_samples": sum(lengths),
            "filenames": names,
            "shard_lengths": lengths,
        }
    (root / "_info.json").write_text(json.dumps(info))
    (root / "classes.json").write_text(json.dumps([{"id": i, "name": n} for i, n in enumerate(CLASSES)]))
    return root


def _run(folder: Path, shards: Path, eval_split: str | None = "auto") -> Path:
    """A run folder as training leaves it: a committed checkpoint whose trainer_state.json holds the run's config."""
    checkpoint = _checkpoint(folder / "checkpoint-00000010")
    config = {"recipe": "finetune", "data": {"shards": str(shards), "eval_split": eval_split, "resize_size": 36}}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 10, "config": config}))
    (checkpoint / "COMMITTED").write_text("10")
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """`vit inspect CHECKPOINT_FOLDER --out DIR` without images: scikit-learn's sample photographs stand in."""
    root = tmp_path_factory.mktemp("inspect")
    result = _inspect(str(_checkpoint(root / "checkpoint-000010")), "--out", str(root / "report"))
    assert result.exit_code == 0, result.output
    return root / "report"


def test_every_figure_is_a_png(report):
    for name in FIGURES.values():
        with Image.open(report / name) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            image.verify()


def test_the_json_holds_the_numbers_in_their_shapes(report):
    data = json.loads((report / "inspection.json").read_text())
    model = data["model"]
    assert (model["image_size"], model["patch_size"], model["grid"], model["pool"]) == (32, 8, [4, 4], "cls")
    assert model["config"]["width"] == 48 and model["parameters"] > 0
    assert model["source"].endswith("model.safetensors")

    ratio = data["filters"]["explained_variance_ratio"]
    assert data["filters"]["components"] == len(ratio) == 28
    assert all(a >= b for a, b in zip(ratio, ratio[1:])) and sum(ratio) <= 1 + 1e-6

    similarity = np.array(data["position_embeddings"]["similarity"])
    assert similarity.shape == (16, 16)
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    np.testing.assert_allclose(similarity, similarity.T, atol=1e-5)

    distances = np.array(data["attention_distance"]["distances"])
    assert distances.shape == (2, 4)  # depth x heads
    assert ((distances >= 0) & (distances <= 32 * 2**0.5)).all()
    # Fig. 7's findings as numbers, from the same matrices (vit.analysis has their known-answer tests)
    assert -1 <= data["position_embeddings"]["spearman"] <= 1
    assert "row_column_excess" in data["position_embeddings"]
    by_block = data["attention_distance"]["attention_distance_by_block"]
    np.testing.assert_allclose(by_block, distances.mean(axis=1), rtol=1e-5)
    ranges = np.array(data["attention_distance"]["attention_distance_range_by_block"])
    np.testing.assert_allclose(ranges, np.stack([distances.min(axis=1), distances.max(axis=1)], axis=1), rtol=1e-5)
    assert -1 <= data["attention_distance"]["distance_depth_spearman"] <= 1

    assert data["images"]["sample_images"] and data["images"]["names"] == ["china.jpg", "flower.jpg"]
    assert data["images"]["origin"] == "sample" and data["images"]["evaluation"] is None
    # a checkpoint folder without its run's trainer_state.json says nothing of what it was evaluated on
    assert any("load_sample_images" in note and "records no evaluation set" in note for note in data["notes"])
    maps = data["attention_rollout"]["maps"]
    assert [m["image"] for m in maps] == ["china.jpg", "flower.jpg"]
    for m in maps:
        grid = np.array(m["map"])
        assert grid.shape == (4, 4) and (grid >= 0).all()
        assert grid.sum() == pytest.approx(1.0, abs=1e-4)
    assert data["figures"] == FIGURES


def test_the_page_embeds_every_figure_and_loads_nothing_else(report):
    page = (report / "inspection.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(FIGURES)
    for name, data in zip(FIGURES.values(), embedded):
        assert base64.b64decode(data) == (report / name).read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external resources
    assert "model.safetensors" in page and "32x32 px" in page
    data = json.loads((report / "inspection.json").read_text())
    assert f"Spearman {data['position_embeddings']['spearman']:+.2f} between similarity and 2-D distance" in page
    assert f"Spearman with depth {data['attention_distance']['distance_depth_spearman']:+.2f}" in page


def test_without_images_a_run_is_inspected_on_its_own_held_out_images(tmp_path):
    # test: three shards, classes in runs, so the first four images are not the first of four classes
    shards = _shards(
        tmp_path / "shards", {"train": [[0, 1, 2, 3, 4]], "val": [[4, 3]], "test": [[0, 0, 1], [1, 1, 2, 2], [3, 4]]}
    )
    run = _run(tmp_path / "runs" / "finetune-x", shards)
    result = _inspect(str(run), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "inspection.json").read_text())
    images = data["images"]
    assert images["origin"] == "evaluation" and not images["sample_images"]
    # the test split (what evaluation scores), the first image of each class in the shards' order, not train or val
    assert images["names"] == ["test007 (cat)", "test009 (dog)", "test012 (eel)", "test014 (fox)"]
    state = str(run / "checkpoint-00000010" / "trainer_state.json")
    assert images["evaluation"] == {"shards": str(shards), "split": "test", "recorded_in": state, "resize_size": 36}
    assert [m["image"] for m in data["attention_rollout"]["maps"]] == images["names"]
    note = " ".join(data["notes"])
    assert f"4 held-out images of the model's evaluation set, the test split of {shards}" in note
    assert "load_sample_images" not in note and "note: no images were given: 4 held-out" in result.output
    page = (tmp_path / "out" / "inspection.html").read_text()
    assert html.escape(f"the model's held-out evaluation set: the test split of {shards}") in page
    assert "test012 (eel)" in page

    # more than the split has classes: one of each, then the next ones read, in the order read
    result = _inspect(str(run), "--num-images", "7", "--out", str(tmp_path / "seven"))
    assert result.exit_code == 0, result.output
    names = json.loads((tmp_path / "seven" / "inspection.json").read_text())["images"]["names"]
    assert [n.split()[0] for n in names] == [
        "test007",
        "test008",
        "test009",
        "test010",
        "test012",
        "test014",
        "test015",
    ]


def test_the_evaluation_set_is_the_split_the_model_was_evaluated_on(tmp_path):
    val_only = _shards(tmp_path / "val-only", {"train": [[0, 1]], "val": [[2, 3]]})
    found = find_evaluation_set(str(_run(tmp_path / "a", val_only) / "checkpoint-00000010" / "model.safetensors"))
    assert (found.shards, found.split, found.resize_size) == (str(val_only), "val", 36)
    both = _shards(tmp_path / "both", {"train": [[0]], "holdout": [[1]], "test": [[2]]})
    found = find_evaluation_set(str(_run(tmp_path / "b", both, eval_split="holdout") / "checkpoint-00000010" / "x"))
    assert found.split == "test"  # what the evaluate step scores, before the split training evaluated on
    train_only = _shards(tmp_path / "train-only", {"train": [[0, 1]]})
    assert find_evaluation_set(str(_run(tmp_path / "c", train_only) / "checkpoint-00000010" / "x")) is None
    assert find_evaluation_set(str(tmp_path / "loose.safetensors")) is None  # a released or bare weights file


def test_an_evaluation_set_that_cannot_be_read_falls_back_to_the_sample_photographs(tmp_path):
    shards = _shards(tmp_path / "shards", {"train": [[0]], "test": [[1, 2]]})
    run = _run(tmp_path / "run", shards)
    (shards / "test-000000.tar").unlink()  # the shards moved or were deleted since the model was evaluated
    result = _inspect(str(run), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "inspection.json").read_text())
    assert data["images"]["origin"] == "sample" and data["images"]["names"] == ["china.jpg", "flower.jpg"]
    assert f"the model's evaluation set, the test split of {shards}, cannot be read" in data["notes"][0]
    assert "test-000000.tar" in data["notes"][0]


# Appended to a copy of the page: once every image has loaded or failed (the load event), each image's natural size
# goes into the DOM, which `chromium --dump-dom` prints.
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const found = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}));
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(found);
  document.body.append(out);
});
</script>"""


def _chromium() -> str:
    """Chromium's path; a failure under CI (whose .ci/run installs it), else a skip saying how to install it."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        reason = "no Chromium to render inspection.html in: apt-get install -y --no-install-recommends chromium"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the page must be checked in a real browser there)")
        pytest.skip(reason)
    return found


def _images_in_browser(chromium: str, page: Path, profile: Path) -> list[dict]:
    checked = page.with_name(f"checked-{page.name}")
    checked.write_text(page.read_text().replace("</body>", f"{_IMAGE_CHECK}\n</body>"))
    result = subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}"]
        + ["--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],  # runs the page's scripts to idle first
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="image-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert result.returncode == 0 and found, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(html.unescape(found[1]))


@pytest.mark.slow
def test_the_page_shows_every_figure_in_a_real_browser(report, tmp_path):
    chromium = _chromium()
    page = tmp_path / "inspection.html"
    shutil.copy(report / "inspection.html", page)
    images = _images_in_browser(chromium, page, tmp_path / "profile")
    assert [i["alt"] for i in images] == list(FIGURES.values())
    assert all(i["complete"] and i["width"] > 0 for i in images), images

    # The check can fail: a figure whose PNG is damaged has no size in the browser.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"(data:image/png;base64,)[A-Za-z0-9+/]{400}", r"\1", page.read_text(), count=1))
    widths = [i["width"] for i in _images_in_browser(chromium, broken, tmp_path / "profile")]
    assert widths[0] == 0 and all(widths[1:]), widths


def test_a_hybrid_gap_model_on_given_images_leaves_out_filters_and_rollout(tmp_path):
    checkpoint = _checkpoint(tmp_path / "hybrid", img_size=64, patch_size=1, resnet_layers=(1, 1), pool="gap")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    single = tmp_path / "c.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(single)

    result = _inspect(str(checkpoint / "model.safetensors"), str(folder), str(single), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "inspection.json").read_text())
    assert data["model"]["hybrid"] and data["filters"] is None and data["attention_rollout"] is None
    assert data["images"]["names"] == ["a.png", "b.png", "c.png"] and not data["images"]["sample_images"]
    assert np.array(data["attention_distance"]["distances"]).shape == (2, 4)
    notes = " ".join(data["notes"])
    assert "stem" in notes and "not pixels" in notes and "pool='gap'" in notes
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["attention_distance.png", "inspection.html", "inspection.json", "position_embeddings.png"]
    page = (tmp_path / "out" / "inspection.html").read_text()
    assert "not pixels" in page and page.count("data:image/png;base64,") == 2


def test_a_registered_model_is_the_pyfunc_s_own_network(monkeypatch):
    network = vit.VisionTransformer(vit.ViTConfig(**TINY)).train()

    class Loaded:
        def unwrap_python_model(self):
            return type("Classifier", (), {"model": network})()

    seen = []
    monkeypatch.setattr("pipelines.registry.predict.load_pyfunc", lambda uri: seen.append(uri) or Loaded())
    model, source = load_inspected_model("models:/vit-digits@champion")
    assert model is network and not model.training
    assert seen == [source] == ["models:/vit-digits@champion"]


def test_a_missing_model_is_a_user_error(tmp_path):
    result = _inspect(str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    result = _inspect(str(_checkpoint(tmp_path / "ck")), str(tmp_path / "no.png"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no such file" in result.output


def test_an_undecodable_image_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = _inspect(str(_checkpoint(tmp_path / "ck")), str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "bad.png" in result.output, result.output
