"""The ImageNet task on a tiny ImageNet folder built here, and (marked) on the real asset slice.

Nothing here may download: an autouse fixture points every hub cache at an empty folder and makes
timm's and huggingface_hub's download functions fail loudly if anything calls them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchsuite.api import CalibrationSet, TaskOptions, sha256_of
from benchsuite.cli import EXIT_USAGE, main
from benchsuite.errors import DataError, UnknownNameError
from benchsuite.tasks import imagenet
from benchsuite.tasks.imagenet import ImageNetTask, canonical_synsets, eval_indices, preprocess_for, scan_split

from conftest import ASSETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Canonical indices chosen so that the folders present are never 0..k-1.
VAL_CLASSES = (3, 417, 998)
TRAIN_CLASSES = (3, 417, 500, 998)
SIZES = ((300, 200), (180, 260), (256, 256), (97, 131))
EXTENSIONS = (".JPEG", ".jpg", ".png", ".jpeg")


def _write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


def make_tiny_imagenet(root: Path, per_class: int = 3, train: bool = True, val: bool = True) -> Path:
    synsets = canonical_synsets()
    seed = 0
    for split, classes, enabled in (("train", TRAIN_CLASSES, train), ("val", VAL_CLASSES, val)):
        if not enabled:
            continue
        for index in classes:
            folder = root / split / synsets[index]
            folder.mkdir(parents=True)
            for k in range(per_class):
                seed += 1
                ext = EXTENSIONS[(seed + k) % len(EXTENSIONS)]
                mode = "L" if seed % 5 == 0 else "RGB"  # some grayscale files, converted to RGB
                _write_image(folder / f"{synsets[index]}_{k:04d}{ext}", SIZES[seed % len(SIZES)], seed, mode)
            (folder / "notes.txt").write_text("not an image")  # ignored
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Empty, private hub caches; any download attempt fails the test."""
    import huggingface_hub
    import timm.models._builder as builder
    import timm.models._hub as hub

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hf" / "hub"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv(imagenet.ALLOW_DOWNLOAD_ENV, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"tests must not download ({args[:2]})")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(builder, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    return cache


class MeanColourNet(nn.Module):
    """A cheap 1000-class model: a linear map of the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(3, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(1000, 3, generator=generator))
            self.fc.bias.copy_(torch.randn(1000, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _vit_tiny() -> nn.Module:
    """vit_tiny_patch16_224 with small seeded random weights (timm's own init takes seconds)."""
    model = imagenet._create("vit_tiny_patch16_224", skip_init=True, pretrained=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def vit_tiny_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _vit_tiny().state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file(state, str(path))
    return path, state


# --------------------------------------------------------------------------------------------
# Names, models, preprocessing
# --------------------------------------------------------------------------------------------


def test_info_and_models():
    assert ImageNetTask.name == "imagenet"
    info = ImageNetTask.info
    assert info.main_metric == "top1" and not info.demo and info.default_calib_size == 32
    assert info.metrics == ("top1", "top5", "agreement", "kl_to_float") and info.modality == "image"
    models = ImageNetTask.models()
    assert list(models) == ["vit-t", "vit-s", "vit-b", "deit-t", "deit-s", "deit-b", "swin-t", "swin-s", "swin-b"]
    # The explicit tags of protocol §1.1 (untagged vit-b and swin-s resolve to other checkpoints).
    assert models["vit-b"].source == "timm:vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert models["swin-s"].source == "timm:swin_small_patch4_window7_224.ms_in1k"
    assert models["swin-b"].source == "timm:swin_base_patch4_window7_224.ms_in22k_ft_in1k"
    assert models["deit-t"].source == "timm:deit_tiny_patch16_224.fb_in1k"
    assert models["deit-s"].family == "timm_vit" and models["swin-t"].family == "timm_swin"
    task = ImageNetTask()
    assert task.resolve_model("vit_small_patch14_dinov2").source == "timm:vit_small_patch14_dinov2"
    assert task.resolve_model("deit_tiny_patch16_224.fb_in1k").family == "timm_vit"
    with pytest.raises(UnknownNameError, match="has no model 'vit-huge'"):
        task.resolve_model("vit-huge")
    with pytest.raises(UnknownNameError, match="no pretrained tag 'fb_in22k'.*tags: fb_in1k"):
        task.resolve_model("deit_tiny_patch16_224.fb_in22k")


@pytest.mark.parametrize(
    "model, crop_pct, resize, mean, std",
    [
        ("vit-s", 0.9, 248, (0.5,) * 3, (0.5,) * 3),
        ("deit-t", 0.875, 256, IMAGENET_MEAN, IMAGENET_STD),
        ("deit-b", 0.875, 256, IMAGENET_MEAN, IMAGENET_STD),
        ("swin-t", 0.9, 248, IMAGENET_MEAN, IMAGENET_STD),
        # Generic timm names: crop_pct 0.875 and mean/std from timm's pretrained_cfg.
        ("vit_small_patch14_dinov2", 0.875, 256, IMAGENET_MEAN, IMAGENET_STD),
        ("vit_tiny_patch16_224", 0.875, 256, (0.5,) * 3, (0.5,) * 3),
    ],
)
def test_preprocessing_per_family(model, crop_pct, resize, mean, std):
    prep = preprocess_for(model)
    assert (prep.crop_pct, prep.resize, prep.interpolation, prep.image_size) == (crop_pct, resize, "bicubic", 224)
    assert prep.mean == pytest.approx(mean) and prep.std == pytest.approx(std)
    manifest = prep.manifest()
    assert manifest["crop_pct"] == crop_pct and manifest["resize"] == resize and manifest["mean"] == list(prep.mean)


def test_transform_matches_timms_eval_pipeline(tiny_root):
    """Shorter side to floor(224 / crop_pct) bicubic, center crop 224: timm's own eval transform."""
    from timm.data import create_transform

    val = scan_split(tiny_root, "val")
    for model in ("deit-t", "vit-s"):
        prep = preprocess_for(model)
        theirs = create_transform(224, crop_pct=prep.crop_pct, interpolation="bicubic", mean=prep.mean, std=prep.std)
        ours = prep.transform()
        for sample_id in val.ids[:4]:
            with Image.open(tiny_root / sample_id) as image:
                rgb = image.convert("RGB")
                crop = ours(rgb)
                assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
                torch.testing.assert_close(prep.normalize(crop[None])[0], theirs(rgb), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Data layout and labels
# --------------------------------------------------------------------------------------------


def test_labels_follow_the_canonical_synset_list(tiny_root):
    synsets = canonical_synsets()
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets) and synsets[0] == "n01440764"
    val = scan_split(tiny_root, "val")
    assert val.classes == tuple(synsets[i] for i in VAL_CLASSES)
    assert len(val) == 3 * len(VAL_CLASSES)  # notes.txt ignored, every extension kept
    assert list(val.ids) == sorted(val.ids) and all(i.startswith("val/n") for i in val.ids)
    for sample_id, label in zip(val.ids, val.labels):
        assert synsets[label] == sample_id.split("/")[1]
    assert sorted(set(val.labels)) == list(VAL_CLASSES)  # canonical indices, not 0..2
    train = scan_split(tiny_root, "train")
    assert sorted(set(train.labels)) == list(TRAIN_CLASSES)


def test_bad_data_roots_are_data_errors(tmp_path, tiny_root):
    def error_for(root) -> str:
        with pytest.raises(DataError) as info:
            ImageNetTask(TaskOptions(data_root=root)).validate()
        message = str(info.value)
        assert "\n" not in message and "ImageFolder layout" in message and "train/<wnid>" in message
        return message

    assert "--data-root imagenet=PATH" in error_for(None)
    assert "does not exist" in error_for(tmp_path / "nowhere")
    assert "no train/ or val/" in error_for(tmp_path)
    only_train = make_tiny_imagenet(tmp_path / "only-train", per_class=1, val=False)
    assert "no val/" in error_for(only_train)
    only_val = make_tiny_imagenet(tmp_path / "only-val", per_class=1, train=False)
    assert "no train/" in error_for(only_val)

    unknown = make_tiny_imagenet(tmp_path / "unknown", per_class=1)
    (unknown / "val" / "cats").mkdir()
    assert "not ImageNet-1k wnids (cats)" in error_for(unknown)

    flat = tmp_path / "flat"
    (flat / "train" / canonical_synsets()[0]).mkdir(parents=True)
    _write_image(flat / "train" / canonical_synsets()[0] / "a.JPEG", (64, 64), 0)
    (flat / "val").mkdir()
    _write_image(flat / "val" / "ILSVRC2012_val_00000001.JPEG", (64, 64), 1)
    assert "no class folders" in error_for(flat)

    ImageNetTask(TaskOptions(data_root=tiny_root)).validate()  # the good one passes
    with pytest.raises(DataError, match="weights file .* does not exist"):
        ImageNetTask(TaskOptions(data_root=tiny_root, weights=tmp_path / "none.safetensors")).validate()


@pytest.mark.parametrize("with_root", [False, True])
def test_cli_without_data_is_one_line_exit_2(with_root, tmp_path, capsys):
    argv = ["run", "--tasks", "imagenet", "--methods", "fp32", "--out", str(tmp_path / "out"), "--no-progress"]
    if with_root:
        argv += ["--data-root", f"imagenet={tmp_path / 'missing'}"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "ImageFolder layout" in err and ("does not exist" in err if with_root else "--data-root" in err)


def test_corrupt_image_is_one_data_error(tmp_path):
    root = make_tiny_imagenet(tmp_path / "corrupt", per_class=1)
    bad = root / "val" / canonical_synsets()[VAL_CLASSES[1]] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="cannot decode imagenet image val/.*broken.JPEG") as info:
        ImageNetTask(TaskOptions(data_root=root)).evaluate(MeanColourNet(), "deit-t")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Calibration and evaluation
# --------------------------------------------------------------------------------------------


def test_calibration_is_seeded_and_recorded(tiny_root):
    task = ImageNetTask(TaskOptions(data_root=tiny_root))
    train = scan_split(tiny_root, "train")
    a = task.calibration_set("deit-t", 5, seed=0)
    b = task.calibration_set("deit-t", 5, seed=0)
    c = task.calibration_set("deit-t", 5, seed=1)
    assert isinstance(a, CalibrationSet) and len(a) == 5
    assert a.sample_ids == b.sample_ids and a.sample_ids != c.sample_ids
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:5].tolist()
    assert list(a.sample_ids) == [train.ids[i] for i in chosen]
    assert a.population_hash == sha256_of(train.ids) == c.population_hash
    inputs = torch.cat(a.batches)
    assert inputs.shape == (5, 3, 224, 224) and inputs.dtype == torch.float32
    assert torch.equal(inputs, torch.cat(b.batches))
    # Exactly the evaluation transform of those files, no labels anywhere.
    prep = preprocess_for("deit-t")
    with Image.open(tiny_root / a.sample_ids[2]) as image:
        expected = prep.normalize(prep.transform()(image.convert("RGB"))[None])[0]
    assert torch.equal(inputs[2], expected)
    assert a.manifest()["sample_ids"][0].startswith("train/n")
    with pytest.raises(DataError, match="between 1 and 12"):
        task.calibration_set("deit-t", 13, seed=0)
    with pytest.raises(DataError):
        task.calibration_set("deit-t", 0, seed=0)


def test_eval_subset_rule():
    first = eval_indices(1000, 50)
    assert first == eval_indices(1000, 50) and len(set(first)) == 50 and first == sorted(first)
    assert first != list(range(50)) and max(first) > 500  # spread, not the first N
    assert set(first) <= set(eval_indices(1000, 200))  # nested limits
    assert eval_indices(10, None) == list(range(10)) == eval_indices(10, 99)


def test_evaluation_subset_cache_and_streaming(tiny_root, monkeypatch):
    model = MeanColourNet().eval()
    full_task = ImageNetTask(TaskOptions(data_root=tiny_root, eval_batch_size=4))
    full = full_task.evaluate(model, "deit-t")
    val = scan_split(tiny_root, "val")
    assert full.outputs.shape == (9, 1000) and full.details["samples"] == 9
    expected_top1 = 100.0 * (full.outputs.argmax(1) == torch.tensor(val.labels)).double().mean().item()
    assert full.metrics["top1"] == pytest.approx(expected_top1)

    limited = ImageNetTask(TaskOptions(data_root=tiny_root, eval_limit=4, eval_batch_size=3))
    subset = limited.evaluate(model, "deit-t")
    rows = eval_indices(9, 4)
    torch.testing.assert_close(subset.outputs, full.outputs[rows], atol=1e-5, rtol=1e-5)
    assert "torch.randperm(9)" in subset.details["eval_subset"]
    with pytest.raises(DataError, match="same eval limit"):
        limited.evaluate(model, "deit-t", reference=full)

    # Decoded once per process: a second evaluation must not decode again ...
    monkeypatch.setattr(imagenet, "_decode_all", lambda *a, **k: pytest.fail("decoded twice"))
    again = full_task.evaluate(model, "deit-t", reference=full)
    assert torch.equal(again.outputs, full.outputs)
    assert again.metrics["agreement"] == 100.0 and again.metrics["kl_to_float"] == 0.0
    # ... and with no cache budget it streams from the files, with the same numbers.
    monkeypatch.setenv(imagenet.CACHE_MB_ENV, "0")
    streamed = full_task.evaluate(model, "deit-t")
    torch.testing.assert_close(streamed.outputs, full.outputs, atol=1e-5, rtol=1e-5)


def test_manifest_records_data_and_preprocessing(tiny_root, vit_tiny_file):
    path, _ = vit_tiny_file
    task = ImageNetTask(TaskOptions(data_root=tiny_root, weights=path, eval_limit=5, eval_batch_size=3))
    manifest = task.data_manifest("deit-t")
    val, train = scan_split(tiny_root, "val"), scan_split(tiny_root, "train")
    prep = manifest["preprocess"]
    assert (prep["crop_pct"], prep["resize"], prep["interpolation"], prep["image_size"]) == (0.875, 256, "bicubic", 224)
    assert prep["mean"] == list(IMAGENET_MEAN) and prep["std"] == list(IMAGENET_STD)
    assert manifest["val_size"] == 9 and manifest["train_size"] == 12 and manifest["eval_size"] == 5
    assert manifest["val_classes"] == 3 and manifest["eval_batch_size"] == 3
    assert manifest["val_files_sha256"] == sha256_of(val.ids) and manifest["train_files_sha256"] == sha256_of(train.ids)
    assert "eval_limit 5" in manifest["eval_subset"]
    assert manifest["model"]["timm_name"] == "deit_tiny_patch16_224.fb_in1k"
    assert manifest["weights"] == {"source": "file", "path": str(path),
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_weights_from_a_safetensors_file(tiny_root, vit_tiny_file, tmp_path):
    path, state = vit_tiny_file
    task = ImageNetTask(TaskOptions(data_root=tiny_root, weights=path, eval_batch_size=4))
    model = task.build_model("vit_tiny_patch16_224")
    assert not model.training and model.patch_embed.img_size == (224, 224)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    evaluation = task.evaluate(model, "vit_tiny_patch16_224")
    labels = torch.tensor(scan_split(tiny_root, "val").labels)
    assert evaluation.outputs.shape == (9, 1000)
    top1 = 100.0 * (evaluation.outputs.argmax(1) == labels).double().mean().item()
    assert evaluation.metrics["top1"] == pytest.approx(top1)
    assert evaluation.metrics["top5"] >= evaluation.metrics["top1"]

    # A weights-only torch checkpoint that nests the state dict under "model" loads too.
    checkpoint = tmp_path / "vit_tiny.pth"
    torch.save({"model": state, "epoch": 3}, checkpoint)
    again = ImageNetTask(TaskOptions(data_root=tiny_root, weights=checkpoint)).build_model("vit_tiny_patch16_224")
    assert torch.equal(again.head.weight, state["head.weight"])


def test_mismatched_weights_are_a_data_error(tiny_root, vit_tiny_file, tmp_path):
    from safetensors.torch import save_file

    _, state = vit_tiny_file
    wrong = dict(state)
    wrong.pop("head.bias")
    wrong["extra.weight"] = torch.zeros(2)
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))
    task = ImageNetTask(TaskOptions(data_root=tiny_root, weights=path))
    with pytest.raises(DataError, match=r"do not fit vit_tiny_patch16_224: missing keys \(1\): head.bias; "
                                        r"unexpected keys \(1\): extra.weight"):
        task.build_model("vit_tiny_patch16_224")
    shaped = dict(state, **{"head.bias": torch.zeros(10)})
    save_file(shaped, str(path))
    with pytest.raises(DataError, match="size mismatch for head.bias"):
        task.build_model("vit_tiny_patch16_224")
    with pytest.raises(DataError, match="do not fit deit-s"):  # a file for another architecture
        ImageNetTask(TaskOptions(data_root=tiny_root, weights=vit_tiny_file[0])).build_model("deit-s")


def test_no_weights_and_no_hub_cache(tiny_root, monkeypatch):
    task = ImageNetTask(TaskOptions(data_root=tiny_root))
    with pytest.raises(DataError, match="--weights imagenet=FILE.*BENCHSUITE_ALLOW_DOWNLOAD=1") as info:
        task.build_model("deit-t")
    assert "timm/deit_tiny_patch16_224.fb_in1k" in str(info.value)
    assert imagenet.hub_weights_file("deit_tiny_patch16_224.fb_in1k") is None
    manifest = task.data_manifest("deit-t")["weights"]
    assert manifest["hub_id"] == "timm/deit_tiny_patch16_224.fb_in1k" and "file" not in manifest
    # DINOv2's hub weights carry no ImageNet-1k head: refused rather than evaluated with a random one.
    with pytest.raises(DataError, match="no ImageNet-1k head"):
        task.build_model("vit_small_patch14_dinov2")


def test_hub_weights_are_used_from_the_local_cache(tiny_root, vit_tiny_file, no_hub):
    """A file already in the Hugging Face cache layout loads through timm without any download."""
    import shutil

    path, state = vit_tiny_file
    repo = no_hub / "hf" / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(path, snapshot / "model.safetensors")

    task = ImageNetTask(TaskOptions(data_root=tiny_root))
    assert imagenet.hub_weights_file("vit_tiny_patch16_224.augreg_in21k_ft_in1k") == snapshot / "model.safetensors"
    model = task.build_model("vit-t")
    assert torch.equal(model.head.weight, state["head.weight"])
    assert torch.equal(model.pos_embed, state["pos_embed"])
    weights = task.data_manifest("vit-t")["weights"]
    assert weights["source"] == "timm hub" and weights["hub_id"] == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert weights["revision"] == commit and weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# The real asset slice
# --------------------------------------------------------------------------------------------


@pytest.mark.real_assets
@pytest.mark.slow
def test_real_dinov2_probe_on_a_val_slice():
    root = ASSETS / "imagenet"
    weights = ASSETS / "weights" / "dinov2_vits14_in1k_probe.safetensors"
    if not (root.is_dir() and weights.is_file()):
        pytest.skip("../shared/assets is absent")
    name = "vit_small_patch14_dinov2"
    # The assets README's protocol: bicubic resize to 256, center crop 224, ImageNet mean/std.
    prep = preprocess_for(name)
    assert (prep.resize, prep.image_size, prep.interpolation) == (256, 224, "bicubic")
    assert prep.mean == IMAGENET_MEAN and prep.std == IMAGENET_STD

    task = ImageNetTask(TaskOptions(data_root=root, weights=weights, eval_limit=100, eval_batch_size=50))
    task.validate()
    val = scan_split(root, "val")
    assert len(val) == 1300 and len(val.classes) == 725
    synsets = canonical_synsets()
    assert all(synsets[label] == sample_id.split("/")[1] for sample_id, label in zip(val.ids, val.labels))
    assert max(val.labels) > len(val.classes)  # a subset: canonical indices, not folder positions

    model = task.build_model(name)
    assert next(model.parameters()).dtype == torch.float32  # stored float16, cast on load
    assert model.patch_embed.num_patches == 256
    evaluation = task.evaluate(model, name)
    assert evaluation.outputs.shape == (100, 1000)
    assert 0.0 < evaluation.metrics["top1"] <= evaluation.metrics["top5"]
    manifest = task.data_manifest(name)
    assert manifest["preprocess"]["crop_pct"] == 0.875 and manifest["eval_size"] == 100
