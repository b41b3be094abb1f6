"""Parity with Hugging Face transformers (the real peer), both directions."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers import ViTConfig as HFViTConfig

import dinokit
from dinokit import ViTConfig
from dinokit.models.formats import hf as hf_format
from dinokit.models.loading import read_checkpoint
from tests.conftest import perturb_scales_and_norms

ATOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)
VIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14)


def hf_model(registers: bool, swiglu: bool = False, **cfg):
    kw = dict(layer_norm_eps=1e-6, layerscale_value=0.5, use_swiglu_ffn=swiglu, **cfg)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    return perturb_scales_and_norms(model).eval()


def compare(hf, ours, x, registers: int, **kwargs) -> None:
    """CLS, patch tokens and every intermediate layer agree. The CLS is read from the normed tokens
    (Dinov2's pooler_output is that row; ViTModel's pooler is no part of the backbone); `kwargs` go to `hf`."""
    with torch.no_grad():
        o = hf(pixel_values=x, output_hidden_states=True, **kwargs)
        f = ours.forward_features(x)
        layers = ours.get_intermediate_layers(x, n=len(ours.blocks), norm=False, return_class_token=True)
    assert (o.last_hidden_state[:, 0] - f["x_norm_clstoken"]).abs().max() <= ATOL
    assert (o.last_hidden_state[:, 1 + registers :] - f["x_norm_patchtokens"]).abs().max() <= ATOL
    if registers:
        assert (o.last_hidden_state[:, 1 : 1 + registers] - f["x_norm_regtokens"]).abs().max() <= ATOL
    for hidden, (patches, cls) in zip(o.hidden_states[1:], layers, strict=True):
        assert (hidden[:, 1 + registers :] - patches).abs().max() <= ATOL
        assert (hidden[:, 0] - cls).abs().max() <= ATOL


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("registers", [False, True])
def test_hf_folder_loads_with_identical_outputs(tmp_path, registers, swiglu):
    hf = hf_model(registers, swiglu, **SMALL)
    hf.save_pretrained(tmp_path)
    ours = dinokit.load_model(tmp_path)
    r = 4 if registers else 0
    assert ours.config.num_register_tokens == r
    assert ours.config.ffn_layer == ("swiglu" if swiglu else "mlp")
    compare(hf, ours, torch.randn(2, 3, 56, 56), r)  # native grid
    if registers:  # Dinov2WithRegisters interpolates exactly as the official reg models
        compare(hf, ours, torch.randn(2, 3, 42, 70), r)


def test_plain_dinov2_off_grid_differs_by_the_dropped_offset_exactly(tmp_path):
    """Current transformers' Dinov2Model drops the official +0.1 interpolation offset: dinokit follows
    the official model by default, and reproduces transformers with interpolate_offset=0.0."""
    hf = hf_model(False, **SMALL)
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 42, 70)
    official = dinokit.load_model(tmp_path)
    like_hf = dinokit.load_model(tmp_path, interpolate_offset=0.0)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 1:]
        assert (official.forward_features(x)["x_norm_patchtokens"] - ref).abs().max() > 1e-3
    compare(hf, like_hf, x, 0)


@pytest.mark.parametrize("registers", [False, True])
def test_vit_s14_config(tmp_path, registers):
    hf = hf_model(registers, **VIT_S)
    hf.save_pretrained(tmp_path)
    ours = dinokit.load_model(tmp_path)
    assert dinokit.count_parameters(ours) == (22_058_112 if registers else 22_056_576)
    r = 4 if registers else 0
    compare(hf, ours, torch.randn(1, 3, 518, 518), r)
    if registers:
        compare(hf, ours, torch.randn(1, 3, 224, 224), r)


def test_export_to_hf_and_load_with_transformers(tmp_path):
    for name, cls in (("vit_micro_p4", Dinov2WithRegistersModel), ("dinov2_vits14_reg", Dinov2WithRegistersModel)):
        ours = perturb_scales_and_norms(
            dinokit.create_model(name, img_size=56 if "reg" in name else 32, patch_size=14 if "reg" in name else 4)
        ).eval()
        folder = dinokit.export_model(ours, tmp_path / name, format="hf")
        hf = cls.from_pretrained(folder).eval()
        size = 56 if "reg" in name else 32
        compare(hf, ours, torch.randn(2, 3, size, size), ours.num_register_tokens)


def test_dino_v1_architecture_exports_to_hf_with_neutral_layerscale(tmp_path):
    ours = perturb_scales_and_norms(dinokit.create_model("dino_vits16", depth=2)).eval()
    hf = Dinov2Model.from_pretrained(dinokit.export_model(ours, tmp_path / "hf", format="hf")).eval()
    compare(hf, ours, torch.randn(1, 3, 224, 224), 0)


def test_image_classification_wrapper_loads_its_backbone(tmp_path):
    config = Dinov2Config(layer_norm_eps=1e-6, num_labels=5, **SMALL)
    clf = perturb_scales_and_norms(Dinov2ForImageClassification(config)).eval()
    clf.save_pretrained(tmp_path)
    ours = dinokit.load_model(tmp_path)
    compare(clf.dinov2, ours, torch.randn(1, 3, 56, 56), 0)


def test_hf_bin_weights_with_in_memory_names_are_read_too(tmp_path):
    """pytorch_model.bin written from a live transformers 5 model, whose attention keys are
    `attention.{q,k,v,o}_proj` rather than the legacy names that save_pretrained writes."""
    hf = hf_model(True, **SMALL)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    compare(hf, dinokit.load_model(tmp_path), torch.randn(1, 3, 56, 56), 4)


def test_hf_weights_file_loads_directly(tmp_path):
    hf = hf_model(True, **SMALL)
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    ours = dinokit.load_model(weights)  # reads config.json beside the file
    assert read_checkpoint(weights)[2] == "hf"
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        folder_out = dinokit.load_model(tmp_path / "hf").forward_features(x)["x_prenorm"]
        assert torch.equal(ours.forward_features(x)["x_prenorm"], folder_out)
    compare(hf, ours, x, 4)
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "w.safetensors").write_bytes(weights.read_bytes())  # no config.json: inferred
    alone = dinokit.load_model(tmp_path / "alone" / "w.safetensors", num_heads=4)  # heads: not in the weights
    compare(hf, alone, x, 4)


def test_image_classification_weights_file_loads_directly(tmp_path):
    config = Dinov2Config(layer_norm_eps=1e-6, num_labels=5, **SMALL)
    clf = perturb_scales_and_norms(Dinov2ForImageClassification(config)).eval()
    clf.save_pretrained(tmp_path)
    assert all(k.startswith(("dinov2.", "classifier.")) for k in clf.state_dict())
    ours = dinokit.load_model(tmp_path / "model.safetensors")
    compare(clf.dinov2, ours, torch.randn(1, 3, 56, 56), 0)


def test_registers_image_classification_wrapper_loads_its_backbone(tmp_path):
    config = Dinov2WithRegistersConfig(layer_norm_eps=1e-6, num_labels=5, num_register_tokens=4, **SMALL)
    clf = perturb_scales_and_norms(Dinov2WithRegistersForImageClassification(config)).eval()
    clf.save_pretrained(tmp_path)
    ours = dinokit.load_model(tmp_path)
    assert ours.config.num_register_tokens == 4
    compare(clf.dinov2_with_registers, ours, torch.randn(1, 3, 56, 56), 4)
    compare(clf.dinov2_with_registers, ours, torch.randn(1, 3, 42, 70), 4)


def test_hf_export_keeps_dinokit_interpolation(tmp_path):
    """vit_micro_p4 resamples its position grid with offset 0 and antialias, as Dinov2WithRegistersModel
    (not Dinov2Model, which has no antialias): it is written as that class with 0 registers, so that
    transformers gives the same outputs at every size."""
    ours = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4")).eval()
    with torch.no_grad():
        ours.pos_embed.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact match: no warning
        folder = dinokit.export_model(ours, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_register_tokens"]) == ("dinov2_with_registers", 0)
    back = dinokit.load_model(folder)
    assert back.config == ViTConfig(**{**ours.config.to_dict(), "init_values": 1.0})
    x = torch.randn(2, 3, 16, 24)  # an 8 x 8 grid resampled to 4 x 6: antialias matters
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x)["x_prenorm"], back.forward_features(x)["x_prenorm"])
    hf, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert isinstance(hf, Dinov2WithRegistersModel)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for size in [(32, 32), (16, 24), (48, 40)]:  # native, and resampled both ways
        compare(hf.eval(), ours, torch.randn(2, 3, *size), 0)


def test_official_dinov2_exports_as_dinov2model_with_a_warning(tmp_path):
    """No transformers class resamples with the official +0.1 offset; the export says so."""
    ours = perturb_scales_and_norms(dinokit.create_model("dinov2_vits14", depth=1, img_size=28)).eval()
    with pytest.warns(UserWarning, match=r"Dinov2Model resamples .* offset 0\.1 .* other than 28 px"):
        folder = dinokit.export_model(ours, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "dinov2"
    compare(AutoModel.from_pretrained(folder).eval(), ours, torch.randn(1, 3, 28, 28), 0)
    back = dinokit.load_model(folder)
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x)["x_prenorm"], back.forward_features(x)["x_prenorm"])


def nano(seed: int):
    torch.manual_seed(seed)
    return perturb_scales_and_norms(dinokit.create_model("vit_nano_p2")).eval()


def test_hf_folder_with_old_shards_and_a_new_model_safetensors_loads_the_new_file(tmp_path):
    """transformers reads model.safetensors before an index; dinokit read the old shards."""
    old, new = nano(0), nano(1)
    AutoModel.from_pretrained(dinokit.export_model(old, tmp_path / "old", format="hf")).save_pretrained(
        tmp_path / "mixed", max_shard_size="20KB"
    )
    assert (tmp_path / "mixed" / "model.safetensors.index.json").exists()
    shutil.copy(
        Path(dinokit.export_model(new, tmp_path / "new", format="hf")) / "model.safetensors", tmp_path / "mixed"
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dinokit.load_model(tmp_path / "mixed")(x), new(x))
        assert torch.allclose(
            AutoModel.from_pretrained(tmp_path / "mixed")(pixel_values=x).pooler_output, new(x), atol=ATOL
        )


def test_hf_export_removes_the_weight_files_of_an_earlier_export(tmp_path):
    old, new = nano(0), nano(1)
    folder = tmp_path / "hf"
    AutoModel.from_pretrained(dinokit.export_model(old, tmp_path / "old", format="hf")).save_pretrained(
        folder, max_shard_size="20KB"
    )
    (folder / "pytorch_model.bin").write_bytes(b"old weights")
    (folder / "README.md").write_text("kept")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    dinokit.export_model(new, folder, format="hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dinokit.load_model(folder)(x), new(x))
        assert torch.allclose(AutoModel.from_pretrained(folder)(pixel_values=x).pooler_output, new(x), atol=ATOL)


def hf_vit(**cfg) -> ViTModel:
    """A transformers ViTModel shaped as DINO v1 (no LayerScale), as facebook/dino-vit{s,b}{16,8} hold."""
    config = HFViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8
    )
    for key, value in cfg.items():
        setattr(config, key, value)
    return perturb_scales_and_norms(ViTModel(config)).eval()


def test_hf_vit_model_of_dino_v1_loads_with_identical_outputs(tmp_path):
    """DINO v1's released weights on the Hub (facebook/dino-vits16, ...) are transformers ViTModel folders
    (model_type 'vit': layernorm_before / intermediate.dense / output.dense, a pooler): dinokit refused
    them as 'not dinov2'."""
    hf = hf_vit(layer_norm_eps=1e-6)
    hf.save_pretrained(tmp_path / "hf")
    ours = dinokit.load_model(tmp_path / "hf")
    assert ours.config.init_values is None and not ours.config.mask_token and ours.config.patch_size == 8
    assert (ours.config.interpolate_offset, ours.config.interpolate_antialias) == (0.1, False)  # official DINO
    compare(hf, ours, torch.randn(2, 3, 32, 32), 0)
    # off the native grid ViTModel drops the +0.1 offset as Dinov2Model does (README): the official model
    # differs from it, and interpolate_offset=0.0 follows it
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        assert (ours.forward_features(x)["x_norm_patchtokens"] - ref).abs().max() > 1e-3
    like_hf = dinokit.load_model(tmp_path / "hf", interpolate_offset=0.0)
    compare(hf, like_hf, x, 0, interpolate_pos_encoding=True)
    # the weights file alone (config.json beside it), and one without any config (eps: the official 1e-6)
    compare(hf, dinokit.load_model(tmp_path / "hf" / "model.safetensors"), torch.randn(1, 3, 32, 32), 0)
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "alone")
    alone = dinokit.load_model(tmp_path / "alone" / "model.safetensors", num_heads=4)
    compare(hf, alone, torch.randn(1, 3, 32, 32), 0)


def test_hf_vit_eps_classification_wrapper_and_in_memory_names(tmp_path):
    """ViTConfig's own default eps (1e-12) is read from config.json; ViTForImageClassification folders
    load their backbone; a pytorch_model.bin of a live transformers 5 ViTModel (`layers.{i}.attention.q_proj`,
    `layers.{i}.mlp.fc1`) loads too."""
    hf = hf_vit()
    hf.save_pretrained(tmp_path / "hf")
    ours = dinokit.load_model(tmp_path / "hf")
    assert ours.config.norm_eps == 1e-12
    compare(hf, ours, torch.randn(1, 3, 32, 32), 0)
    clf = ViTForImageClassification(HFViTConfig(**{**hf.config.to_dict(), "num_labels": 3}))
    clf.vit.load_state_dict(hf.state_dict(), strict=False)
    clf.save_pretrained(tmp_path / "clf")
    compare(hf, dinokit.load_model(tmp_path / "clf"), torch.randn(1, 3, 32, 32), 0)
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert any(k.startswith("layers.0.") for k in hf.state_dict())
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    compare(hf, dinokit.load_model(tmp_path / "hf"), torch.randn(1, 3, 32, 32), 0)


@pytest.mark.parametrize(
    ("name", "patch"), [("dino_vits16", 16), ("dino_vits8", 8), ("dino_vitb16", 16), ("dino_vitb8", 8)]
)
def test_full_size_dino_v1_keys_and_shapes_equal_those_of_vit_model(name, patch):
    """The released DINO v1 sizes, built on the meta device: ViTModel's weights map onto them one to one."""
    with torch.device("meta"):
        ours = dinokit.create_model(name)
        config = HFViTConfig(
            hidden_size=ours.embed_dim,
            num_hidden_layers=12,
            num_attention_heads=ours.config.num_heads,
            intermediate_size=4 * ours.embed_dim,
            patch_size=patch,
        )
        hf = ViTModel(config, add_pooling_layer=False)
    shapes = {k: v.shape for k, v in hf_format.hf_to_official(hf.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items()}


def test_hf_weights_inside_a_training_checkpoint_or_under_a_wrapper_prefix_load(tmp_path):
    """A transformers model's state dict saved by a training loop ({"model": ...}), under DDP (`module.`)
    or as a `backbone.` beside a head: stripping the training prefixes also cut HF's own `encoder.` from
    `encoder.layer.{i}`, and the file was refused as 'not a ViT backbone'."""
    hf = hf_model(True, **SMALL)
    sd = hf.state_dict()
    config = Dinov2WithRegistersConfig(num_labels=3, num_register_tokens=4, layer_norm_eps=1e-6, **SMALL)
    clf = Dinov2WithRegistersForImageClassification(config)
    clf.dinov2_with_registers.load_state_dict(sd)
    for name, obj in [
        ("model", {"model": sd, "optimizer": {}, "epoch": 3}),
        ("ddp", {f"module.{k}": v for k, v in sd.items()}),
        ("backbone", {f"backbone.{k}": v for k, v in sd.items()} | {"head.weight": torch.zeros(3, 64)}),
        ("classifier", {"state_dict": {f"module.{k}": v for k, v in clf.state_dict().items()}}),
    ]:
        torch.save(obj, tmp_path / f"{name}.pth")
        ours = dinokit.load_model(tmp_path / f"{name}.pth", num_heads=4)
        assert read_checkpoint(tmp_path / f"{name}.pth")[2] == "hf"
        compare(hf, ours, torch.randn(1, 3, 42, 70), 4)


def test_a_config_json_beside_hf_weights_that_is_no_transformers_config_is_ignored(tmp_path):
    """A training run's own config.json (no model_type) beside a saved HF state dict made the weights
    unloadable ('config.json has model_type None'): only a transformers config describes the weights."""
    hf = hf_model(True, **SMALL)
    save_file(hf.state_dict(), tmp_path / "weights.safetensors")
    torch.save({"model": hf.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.001, "epochs": 10, "batch_size": 64}))
    for name in ("weights.safetensors", "checkpoint.pth"):
        compare(hf, dinokit.load_model(tmp_path / name, num_heads=4), torch.randn(1, 3, 42, 70), 4)


@pytest.mark.parametrize("name", [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")])
def test_full_size_dinov2_keys_and_shapes_equal_those_of_transformers(name):
    """Every released DINOv2 size, on the meta device: transformers' model maps onto it one to one (ViT-g's
    SwiGLU width included), and the export writes exactly the names of transformers' files."""
    with torch.device("meta"):
        ours = dinokit.create_model(name)
        c = ours.config
        kw = dict(
            hidden_size=c.embed_dim,
            num_hidden_layers=c.depth,
            num_attention_heads=c.num_heads,
            image_size=518,
            patch_size=14,
            use_swiglu_ffn=c.ffn_layer == "swiglu",
        )
        if c.num_register_tokens:
            hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
        else:
            hf = Dinov2Model(Dinov2Config(**kw))
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in hf_format.hf_to_official(hf.state_dict()).items()} == expected
    assert {
        k: v.shape for k, v in hf_format.hf_to_official(hf_format.official_to_hf(ours.state_dict(), c)).items()
    } == expected


@pytest.mark.parametrize("registers", [False, True])
def test_an_hf_config_whose_image_size_is_a_list_loads_where_square_and_is_a_clear_error_otherwise(tmp_path, registers):
    """transformers' configs take image_size as a number or a [height, width] list; a list was 'a value of
    the wrong type'. [56, 56] is the same model as 56; [56, 70] builds a 4 x 5 position grid, which the
    official model (square grid) cannot hold, and which transformers' own forward cannot resample either."""
    hf = hf_model(registers, **{**SMALL, "image_size": [56, 56]})
    hf.save_pretrained(tmp_path / "square")
    ours = dinokit.load_model(tmp_path / "square")
    assert ours.config.img_size == 56
    r = 4 if registers else 0
    compare(hf, ours, torch.randn(2, 3, 56, 56), r)
    if registers:  # Dinov2WithRegisters resamples as the model off the grid
        compare(hf, ours, torch.randn(1, 3, 42, 70), r)
    hf_model(registers, **{**SMALL, "image_size": [56, 70]}).save_pretrained(tmp_path / "wide")
    with pytest.raises(dinokit.DinokitError, match=r"image_size \[56, 70\] is not square") as e:
        dinokit.load_model(tmp_path / "wide")
    assert "resample_abs_pos_embed" in str(e.value)
