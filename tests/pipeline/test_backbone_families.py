"""timm/, open_clip/ and hf/ backbones through `geo extract` -> `geo fit-head` -> `geo predict`.

Small random-initialised members of each family (nothing is downloaded): the cached
features must equal the library's own preprocessing + forward on the same image, the
provenance must round-trip and be enforced, and the offline-weights error must name the
model, the file and the cache folder.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from support.images import write_dataset  # noqa: E402

from geo.cache.store import FeatureCache  # noqa: E402
from geo.cli import cli  # noqa: E402
from geo.pipeline.backbone import backbone_eval_transform, create_backbone  # noqa: E402
from geo.pipeline.images import describe_transform, load_rgb  # noqa: E402

CPU = ["--device", "cpu", "--precision", "fp32"]
EXTRACT = ["--finetune-epochs", "0", "--batch-size", "4", "--workers", "0", *CPU]
FIT = ["--head", "mvmf", "--n-cells", "6", "--epochs", "1", "--batch-size", "8", "--quiet", *CPU]


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def _trunk_state(checkpoint: Path) -> dict:
    """The trunk weights of a geo backbone checkpoint, as the library's own module names them."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}


def _cached_row(cache_path: Path, row_id: str) -> np.ndarray:
    with FeatureCache(cache_path) as cache:
        return cache.load_features([cache.ids.tolist().index(row_id)])[0].astype(np.float32)


def _pipeline(tmp_path: Path, manifest: Path, backbone: str, *extra) -> tuple[Path, dict]:
    """extract -> fit-head -> predict through the CLI; returns (cache path, provenance)."""
    cache = tmp_path / "cache.h5"
    res = _invoke("extract", manifest, "--out", cache, "--backbone", backbone, *EXTRACT, *extra)
    assert res.exit_code == 0, res.output
    res = _invoke("fit-head", cache, *FIT, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _invoke("predict", tmp_path / "run", manifest.parent / "img000.jpg", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert not [w for w in caught if "transform differs" in str(w.message)]  # predict preprocesses as extract did
    line = json.loads([ln for ln in res.output.splitlines() if ln.startswith("{")][0])
    assert line["ok"] and len(line["locations"]) == 5
    with FeatureCache(cache) as c:
        provenance = dict(c.provenance)
    return cache, provenance


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("families") / "data", 12)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A tiny CLIP vision tower with projection and its image processor, saved like a hub model."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folder)
    return folder


# ---- each family end to end, features against the library's own forward ----------------


@pytest.mark.slow
def test_timm_vit_end_to_end_equals_timm_forward(tmp_path, data):
    cache, prov = _pipeline(tmp_path, data, "timm/vit_tiny_patch16_224")
    # Reference: timm's own model (with its classifier), its own eval transform, pre-logits features.
    ref_model = timm.create_model("vit_tiny_patch16_224").eval()
    missing, unexpected = ref_model.load_state_dict(_trunk_state(Path(prov["checkpoint_path"])), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref_model))
    x = transform(load_rgb(data.parent / "img005.jpg"))[None]
    with torch.no_grad():
        ref = ref_model.forward_head(ref_model.forward_features(x), pre_logits=True)[0].numpy()
    assert ref.shape == (192,) and int(prov["image_size"]) == 224
    np.testing.assert_allclose(_cached_row(cache, "id005"), ref, rtol=2e-3, atol=2e-3)  # float16 storage
    assert "bicubic" in prov["transform"] and "Resize(size=248" in prov["transform"]  # crop_pct 0.9
    assert "clip_features" not in prov


@pytest.mark.slow
def test_timm_convnext_end_to_end_with_image_size_override(tmp_path, data):
    with pytest.warns(UserWarning, match="--image-size 64 overrides the 224 px preprocessing"):
        cache, prov = _pipeline(tmp_path, data, "timm/convnext_atto", "--image-size", "64")
    assert int(prov["image_size"]) == 64 and "CenterCrop(size=(64, 64))" in prov["transform"]
    ref_model = timm.create_model("convnext_atto").eval()
    ref_model.load_state_dict(_trunk_state(Path(prov["checkpoint_path"])), strict=False)
    # timm's own eval transform at 64 px, with the model's crop_pct (0.875 -> resize 73).
    cfg = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=ref_model)
    x = timm.data.create_transform(**cfg)(load_rgb(data.parent / "img002.jpg"))[None]
    with torch.no_grad():
        ref = ref_model.forward_head(ref_model.forward_features(x), pre_logits=True)[0].numpy()
    np.testing.assert_allclose(_cached_row(cache, "id002"), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_open_clip_end_to_end_equals_encode_image(tmp_path, data):
    cache, prov = _pipeline(tmp_path, data, "open_clip/ViT-B-32")
    assert prov["clip_features"] == "projected" and int(prov["image_size"]) == 224
    # Reference: the whole OpenCLIP model (text tower too) and its own preprocess.
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.visual.load_state_dict(_trunk_state(Path(prov["checkpoint_path"])))
    x = preprocess(load_rgb(data.parent / "img001.jpg"))[None]
    with torch.no_grad():
        ref = model.eval().encode_image(x)[0].numpy()
    assert ref.shape == (512,)
    np.testing.assert_allclose(_cached_row(cache, "id001"), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_hf_clip_end_to_end_equals_image_embeds(tmp_path, data, tiny_hf_clip):
    cache, prov = _pipeline(tmp_path, data, f"hf/{tiny_hf_clip}", "--weights", "pretrained")
    assert prov["clip_features"] == "projected" and int(prov["image_size"]) == 32
    # Reference: transformers' own model and its PIL image processor on the same file.
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(tiny_hf_clip).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_hf_clip, backend="pil")
    x = processor(images=Image.open(data.parent / "img003.jpg").convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=x).image_embeds[0].numpy()
    np.testing.assert_allclose(_cached_row(cache, "id003"), ref, rtol=2e-3, atol=2e-3)
    # The checkpoint alone rebuilds the tower (config and preprocessing inside): predict works without the folder.
    backbone = create_backbone(prov["backbone"], prov["checkpoint_path"], num_classes=3)
    assert describe_transform(backbone_eval_transform(backbone)) == prov["transform"]


def test_hf_clip_pre_projection_is_the_pooled_output(tmp_path, data, tiny_hf_clip):
    res = _invoke("extract", data, "--out", tmp_path / "pre.h5", "--backbone", f"hf/{tiny_hf_clip}",
                  "--weights", "pretrained", "--clip-features", "pre-projection", *EXTRACT)
    assert res.exit_code == 0, res.output
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(tiny_hf_clip).eval()
    backbone = create_backbone(f"hf/{tiny_hf_clip}", "pretrained", clip_features="pre-projection")
    x = backbone_eval_transform(backbone)(load_rgb(data.parent / "img004.jpg"))[None]
    with torch.no_grad():
        ref = model.vision_model(pixel_values=x).pooler_output[0].numpy()  # post-layernorm CLS, width 32
    np.testing.assert_allclose(_cached_row(tmp_path / "pre.h5", "id004"), ref, rtol=2e-3, atol=2e-3)
    with FeatureCache(tmp_path / "pre.h5") as cache:
        assert cache.feature_dim == 32 and cache.provenance["clip_features"] == "pre-projection"


def test_open_clip_pre_projection_times_proj_is_the_projected_embedding():
    projected = create_backbone("open_clip/ViT-B-32", "none", seed=3).eval()
    pre = create_backbone("open_clip/ViT-B-32", "none", seed=3, clip_features="pre-projection").eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        p, q = projected.forward_features(x), pre.forward_features(x)
    assert q.shape == (2, 768) and p.shape == (2, 512)
    torch.testing.assert_close(q @ projected.trunk.proj, p, rtol=1e-4, atol=1e-4)


# ---- provenance: recorded, round-tripped, enforced --------------------------------------


@pytest.mark.slow
def test_a_cache_of_another_backbone_is_refused(tmp_path, data):
    runner_args = ("--image-size", "32")
    with pytest.warns(UserWarning):
        vit, prov = _pipeline(tmp_path, data, "timm/vit_tiny_patch16_224", *runner_args)
        res = _invoke("extract", data, "--out", tmp_path / "deit.h5", "--backbone", "timm/deit_tiny_patch16_224",
                      *runner_args, *EXTRACT)
    assert res.exit_code == 0, res.output
    # Same width (192), another backbone: evaluating the ViT run on the DeiT cache is refused.
    res = _invoke("evaluate", tmp_path / "run", "--cache", tmp_path / "deit.h5")
    assert res.exit_code == 2 and "provenance differs" in res.output and "backbone" in res.output
    # ... and so is predicting with the DeiT checkpoint in place of the ViT one.
    with FeatureCache(tmp_path / "deit.h5") as deit:
        other = deit.provenance["checkpoint_path"]
    res = _invoke("predict", tmp_path / "run", data.parent / "img000.jpg", "--backbone-checkpoint", other)
    assert res.exit_code == 2 and "refusing" in res.output
    # Provenance round trip: the checkpoint rebuilds the same model size and transform.
    backbone = create_backbone(prov["backbone"], prov["checkpoint_path"], num_classes=2)
    assert backbone.preprocess.image_size == int(prov["image_size"]) == 32
    assert describe_transform(backbone_eval_transform(backbone)) == prov["transform"]
    config = json.loads((tmp_path / "cache.h5.config.json").read_text())
    assert config["image_size"] == 32 and config["provenance"]["transform"] == prov["transform"]


# ---- errors before any work --------------------------------------------------------------


def test_bad_backbone_options_are_clear_errors(tmp_path, data):
    def run(*args):
        return _invoke("extract", data, "--out", tmp_path / "x.h5", *args, *EXTRACT)

    res = run("--backbone", "timm/not_a_model_xyz")
    assert res.exit_code == 2 and "--backbone timm/not_a_model_xyz" in res.output
    res = run("--backbone", "open_clip/ViT-B-32:no_such_tag")
    assert res.exit_code == 2 and "no pretrained tag 'no_such_tag'" in res.output and "openai" in res.output
    res = run("--backbone", "timm/convnext_atto", "--image-size", "32", "--clip-features", "pre-projection")
    assert res.exit_code == 2 and "--clip-features" in res.output and "not a CLIP image tower" in res.output
    res = run("--backbone", "resnet18", "--clip-features", "projected")
    assert res.exit_code == 2 and "not a CLIP image tower" in res.output
    res = run("--backbone", "timm/vit_tiny_patch16_224", "--image-size", "32", "--finetune-blocks", "13")
    assert res.exit_code == 2 and "--finetune-blocks 13" in res.output and "has 12 blocks" in res.output
    res = run("--backbone", "open_clip/ViT-B-32", "--weights", "pretrained")
    assert res.exit_code == 2 and "open_clip/ViT-B-32:TAG" in res.output
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("backbone, expected", [
    ("timm/vit_tiny_patch16_224", ["timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors"]),
    ("open_clip/ViT-B-32:openai", ["timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"]),
    ("hf/openai/clip-vit-base-patch32", ["openai/clip-vit-base-patch32", "config.json"]),
])
def test_pretrained_weights_offline_name_the_model_file_and_cache_folder(tmp_path, monkeypatch, data,
                                                                          backbone, expected):
    empty = tmp_path / "hub"
    empty.mkdir()
    for var in ("HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _invoke("extract", data, "--out", tmp_path / "x.h5", "--backbone", backbone, "--weights", "pretrained",
                  *EXTRACT)
    assert res.exit_code == 2, res.output
    message = res.output.replace("\n", " ")
    for text in expected + [str(empty)]:
        assert text in message
    assert not list(empty.rglob("*.safetensors"))  # nothing was downloaded


# ---- fine-tuning the last blocks ---------------------------------------------------------


def test_finetune_blocks_freezes_the_stem_and_earlier_blocks():
    backbone = create_backbone("timm/vit_tiny_patch16_224", "none", num_classes=3, image_size=32)
    assert backbone.n_blocks == 12
    backbone.freeze_all_but_last(2)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert any(n.startswith("trunk.blocks.10.") for n in trainable)
    assert any(n.startswith("trunk.blocks.11.") for n in trainable)
    assert {"trunk.norm.weight", "classifier.weight"} <= trainable  # what follows the blocks trains
    assert not any(n.startswith(("trunk.blocks.9.", "trunk.patch_embed", "trunk.pos_embed", "trunk.cls_token"))
                   for n in trainable)
    backbone.train()
    assert not backbone.trunk.blocks[0].training and backbone.trunk.blocks[11].training


@pytest.mark.slow
def test_cli_finetune_last_block_changes_only_it(tmp_path, data):
    with pytest.warns(UserWarning):
        res = _invoke("extract", data, "--out", tmp_path / "ft.h5", "--backbone", "timm/convnext_atto",
                      "--image-size", "32", "--finetune-epochs", "1", "--finetune-blocks", "1",
                      "--batch-size", "4", "--workers", "0", "--lr", "1e-2", *CPU)
    assert res.exit_code == 0, res.output
    tuned = _trunk_state(tmp_path / "ft.checkpoints" / "backbone.pt")
    start = create_backbone("timm/convnext_atto", "none", image_size=32).trunk.state_dict()
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert changed and all(k.startswith(("stages.3.", "head.")) for k in changed)
    config = json.loads((tmp_path / "ft.h5.config.json").read_text())
    assert config["finetune_blocks"] == 1 and config["provenance"]["finetune_blocks"] == 1


def test_default_lr_for_pretrained_weights_is_1e5():
    from geo.pipeline.finetune import FinetuneConfig

    assert FinetuneConfig().resolved_lr("pretrained") == FinetuneConfig().resolved_lr("imagenet") == 1e-5
    assert FinetuneConfig().resolved_lr("none") == 1e-3


# DDP extraction with a timm ViT: tests/pipeline/test_ddp.py (parametrised over backbones).


def test_eval_transforms_equal_the_libraries_own_on_a_non_square_photo(tiny_hf_clip):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (257, 301, 3), dtype=np.uint8))  # odd sides: crop offsets
    backbone = create_backbone("timm/convnext_atto", "none")
    ref_model = timm.create_model("convnext_atto")
    ref = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref_model))(photo)
    torch.testing.assert_close(backbone_eval_transform(backbone)(photo), ref)
    backbone = create_backbone(f"hf/{tiny_hf_clip}", "pretrained")
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_hf_clip, backend="pil")
    ref = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(backbone_eval_transform(backbone)(photo), ref, rtol=1e-5, atol=1e-5)
