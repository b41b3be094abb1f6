"""The Python API as a notebook user meets it: what a model and the helpers take, what they return, and
that a call leaves the notebook's global state (threads, flags, random streams, logging, cwd) as it was."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.errors import DinokitError, ModelInputError


@pytest.fixture(scope="module")
def micro():
    """A 4-block, 96-dim ViT with 4 px patches (32 px native), random init, in eval mode."""
    torch.manual_seed(0)
    return dinokit.create_model("vit_micro_p4").eval()


def photo(size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


WRONG_INPUTS = {
    "a PIL image": (lambda: photo(), ["PIL.Image.Image", "dinokit.eval_transform(size"]),
    "a numpy HWC array": (lambda: np.asarray(photo()), ["numpy.ndarray", "dinokit.eval_transform(size"]),
    "uint8 pixels": (
        lambda: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
        ["torch.uint8", "dinokit.data.transforms.normalize()(images)"],
    ),
    "one image without the batch dimension": (lambda: torch.randn(3, 32, 32), ["images.unsqueeze(0)"]),
    "channels last (B, H, W, C)": (lambda: torch.randn(2, 32, 32, 3), ["images.permute(0, 3, 1, 2)"]),
    "grayscale": (lambda: torch.randn(2, 1, 32, 32), ["3 channels", "convert('RGB')"]),
    "a size off the patch grid": (lambda: torch.randn(1, 3, 30, 30), ["28x28 (crop) or 32x32 (pad)"]),
    "another device": (lambda: torch.randn(1, 3, 32, 32, device="meta"), ["on meta", "model on cpu", ".to("]),
}


@pytest.mark.parametrize("call", ["forward", "forward_features", "get_intermediate_layers", "get_last_selfattention"])
@pytest.mark.parametrize("kind", list(WRONG_INPUTS))
def test_inputs_a_model_cannot_take_are_named_with_their_fix(micro, kind, call):
    make, fragments = WRONG_INPUTS[kind]
    with pytest.raises(ModelInputError) as err:
        getattr(micro, call)(make())
    assert isinstance(err.value, DinokitError) and isinstance(err.value, ValueError)  # what callers catch
    for fragment in fragments:
        assert fragment in str(err.value)


def test_float_images_of_another_dtype_are_cast_to_the_weights_dtype(micro):
    """As transformers' Dinov2Model: model.half() / .bfloat16() take float32 images, a float32 model
    takes float64 or bf16 ones (the official model fails with a dtype mismatch in its convolution)."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = micro(x)
        assert torch.equal(micro(x.double()), reference)
        assert torch.equal(micro(x.bfloat16()), micro(x.bfloat16().float()))
        for dtype in (torch.float16, torch.bfloat16):
            low = dinokit.create_model("vit_micro_p4").eval()
            low.load_state_dict(micro.state_dict())
            low.to(dtype)
            out = low(x)
            assert out.dtype == dtype and torch.equal(out, low(x.to(dtype)))


def test_grad_mode_memory_format_and_compile_give_the_same_features(micro):
    x = torch.randn(3, 3, 32, 36)
    with torch.no_grad():
        reference = micro.forward_features(x)["x_norm_patchtokens"]
    with_grad = micro.forward_features(x.requires_grad_())["x_norm_patchtokens"]
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), reference, rtol=0, atol=1e-5)
    channels_last = dinokit.create_model("vit_micro_p4").eval()
    channels_last.load_state_dict(micro.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    compiled = torch.compile(micro, backend="eager")  # inductor needs a compiler; the graph capture is ours
    with torch.no_grad():
        out = channels_last.forward_features(x.detach().to(memory_format=torch.channels_last))
        torch.testing.assert_close(out["x_norm_patchtokens"], reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled(x.detach()), micro(x.detach()), rtol=0, atol=1e-6)


def test_eval_transform_takes_numpy_photos_and_pil_images_of_any_mode_as_rgb():
    """A numpy (H, W, 3) uint8 array went through torchvision's v2 steps unresized and uncropped (48 x 40
    stayed 48 x 40); a grayscale PIL image gave one channel, which the model then refused."""
    transform = dinokit.eval_transform(32, patch_size=4)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    reference = transform(rgb)
    assert reference.shape == (3, 32, 32)
    assert torch.equal(transform(np.asarray(rgb)), reference)
    gray = rgb.convert("L")
    assert torch.equal(transform(gray), transform(gray.convert("RGB")))
    assert torch.equal(transform(np.asarray(gray)), transform(gray.convert("RGB")))
    with pytest.raises(DinokitError, match=r"uint8 \(H, W\) or \(H, W, 3\) array, got float64"):
        transform(np.asarray(rgb) / 255.0)


def test_eval_transform_converts_pil_images_and_arrays_as_dinokit_converts_the_files_it_opens(tmp_path):
    """The transform converted other modes with PIL's convert("RGB"), not as `open_rgb` converts the
    files that embed and the evals open (`data.images.to_rgb`): a transparent RGBA image kept the colour
    under its alpha (here black) where a file is composited on white, and a 16-bit image was clipped to
    white where a file is rescaled, so a notebook's features of an image were not embed's."""
    from dinokit.data.images import open_rgb

    transform = dinokit.eval_transform(32, patch_size=4)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)  # a red square on a transparent (black) background
    sixteen = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    for name, image in (("rgba.png", Image.fromarray(rgba)), ("gray16.png", Image.fromarray(sixteen))):
        image.save(tmp_path / name)
        as_embed_opens_it = transform(open_rgb(tmp_path / name))
        with Image.open(tmp_path / name) as opened:
            assert torch.equal(transform(opened), as_embed_opens_it), name
    assert torch.equal(transform(rgba), transform(open_rgb(tmp_path / "rgba.png")))


def test_a_submodule_is_reachable_from_a_bare_import_dinokit():
    """`import dinokit` imported dinokit.models (and so dinokit.io) at its top, so
    dinokit.models.snap_to_patch_multiple(...) (README) worked after it; the lazy table left them out
    ("module 'dinokit' has no attribute 'models'"). A fresh interpreter: this one imported them."""
    import subprocess
    import sys

    probe = "import dinokit; print(dinokit.models.snap_to_patch_multiple.__name__, dinokit.io.atomic_write.__name__)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout.split()) == (0, ["snap_to_patch_multiple", "atomic_write"]), run.stderr
    assert not hasattr(dinokit, "no_such_module")


def test_finetune_takes_pathlib_paths_as_every_other_command(tmp_path):
    """dinokit.finetune(model=Path(...)) failed with 'bad value for model: Object of type PosixPath is
    not JSON serializable' (pretrain, embed, index, eval and predict took Paths)."""
    from dinokit.data.synthetic import write_classification_set

    write_classification_set(tmp_path, per_class=2, size=16, seed=0, split="train")
    write_classification_set(tmp_path, per_class=1, size=16, seed=1, split="val")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    keys = dict(image_size=16, epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")
    out = tmp_path / "ft"
    dinokit.finetune(model=Path(weights), train=tmp_path / "train", val=tmp_path / "val", out=out, **keys)
    assert (out / "classifier.safetensors").is_file()


# ----------------------------------------------------------------------------------- global state
def global_state() -> dict:
    """What a notebook set up and a library must leave as it found it."""
    import logging
    import os
    import random
    import signal
    import sys
    import warnings

    from PIL import ImageFile

    loggers = {"": logging.getLogger(), **logging.root.manager.loggerDict}
    matplotlib = sys.modules.get("matplotlib")
    return {
        "threads": torch.get_num_threads(),
        "flags": (
            torch.get_float32_matmul_precision(),
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_anomaly_enabled(),
            torch.get_default_dtype(),
        ),
        "numpy_rng": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "python_rng": random.getstate(),
        "warnings_filters": list(warnings.filters),
        "logging": {
            name: (log.level, list(log.handlers), log.propagate, log.disabled)
            for name, log in loggers.items()
            if isinstance(log, logging.Logger)
        },
        "logging_disabled": logging.root.manager.disable,
        "cwd": os.getcwd(),
        "environ": dict(os.environ),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)],
        "pil": (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES),
        "matplotlib_backend": None if matplotlib is None else matplotlib.rcParams._get_backend_or_none(),
        "numpy_errors": np.geterr(),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Rendered 16 px shapes (train / val), a vit_nano_p2 file, its embedding, index and linear probe."""
    from dinokit.cli import main
    from dinokit.data.synthetic import write_classification_set

    root = tmp_path_factory.mktemp("api")
    write_classification_set(root, per_class=2, size=16, seed=0, split="train")
    write_classification_set(root, per_class=1, size=16, seed=1, split="val")
    torch.manual_seed(0)
    model = dinokit.create_model("vit_nano_p2").eval()
    weights = dinokit.export_model(model, root / "nano.safetensors")
    dinokit.embed(model=weights, data=root / "val", out=root / "emb", image_size=16, num_workers=0, progress=False)
    dinokit.build_index(features=root / "emb", out=root / "val.index")
    probe = ["image_size=16", "num_workers=0", "epochs=2", "learning_rates=[0.1]", "precision=fp32"]
    assert main(["eval", "linear", f"model={weights}", f"train={root / 'train'}", f"val={root / 'val'}",
                 f"out={root / 'lin'}", *probe]) == 0  # fmt: skip
    transform = dinokit.eval_transform(16, patch_size=2)
    paths = dinokit.list_images(root / "val")
    image = transform(Image.open(paths[0]))
    grids = dinokit.patch_features(model, [image, image])
    return dict(root=root, model=model, weights=weights, transform=transform, paths=paths, image=image, grids=grids)


def call_eval_linear(i, root, weights, **_):
    from dinokit.eval.classification import eval_linear

    eval_linear(model=weights, train=root / "train", val=root / "val", out=root / f"lin{i}", image_size=16,
                num_workers=0, epochs=2, learning_rates=[0.1], precision="fp32")  # fmt: skip


def call_pretrain(i, root, **_):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_helpers import TINY

    dinokit.pretrain(data=root / "train", out=root / f"run{i}", **{**TINY, "max_iterations": 2})


def call_finetune(i, root, weights, **_):
    dinokit.finetune(model=weights, train=root / "train", val=root / "val", out=root / f"ft{i}", image_size=16,
                     epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")  # fmt: skip


CALLS = {
    "load_model": lambda i, weights, **_: dinokit.load_model(weights),
    "export_model": lambda i, model, root, **_: dinokit.export_model(model, root / f"copy{i}.safetensors"),
    "eval_transform": lambda i, **_: dinokit.eval_transform(16, patch_size=2),
    "list_images": lambda i, root, **_: dinokit.list_images(root / "train"),
    "extract_features": lambda i, model, paths, transform, **_: dinokit.extract_features(
        model, paths, transform, which=["cls", "patch_tokens"], num_workers=i, progress=False
    ),
    "embed": lambda i, root, weights, **_: dinokit.embed(
        model=weights, data=root / "val", out=root / f"emb{i}", image_size=16, num_workers=0, progress=False
    ),
    "read_embeddings": lambda i, root, **_: dinokit.read_embeddings(root / "emb"),
    "build_index": lambda i, root, **_: dinokit.build_index(features=root / "emb", out=root / f"i{i}.index"),
    "search_index": lambda i, root, paths, **_: dinokit.search_index(root / "val.index", paths[0], k=2),
    "attention_maps": lambda i, model, image, **_: dinokit.attention_maps(model, image),
    "patch_features": lambda i, model, image, **_: dinokit.patch_features(model, [image]),
    "pca_rgb": lambda i, grids, **_: dinokit.pca_rgb(grids, foreground_threshold=0.5),
    "patch_similarity": lambda i, grids, **_: dinokit.patch_similarity(grids[0], (1, 1), target=grids[1]),
    "segment_features": lambda i, grids, **_: dinokit.segment_features(
        [(grids[0], np.eye(16, dtype=bool))], grids[1], size=(16, 16)
    ),
    "match_patches": lambda i, grids, **_: dinokit.match_patches(grids[0], grids[1], max_matches=5),
    "best_match_similarity": lambda i, grids, **_: dinokit.best_match_similarity(grids[0], grids[1]),
    "predict_classification": lambda i, root, **_: dinokit.predict_classification(
        head=root / "lin", images=root / "val", out=root / f"pred{i}.csv", num_workers=0
    ),
    "eval_linear": call_eval_linear,
    "pretrain": call_pretrain,
    "finetune": call_finetune,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_call_leaves_the_notebooks_global_state_as_it_was(inputs, name):
    """Threads, PyTorch flags, the numpy / random streams, warnings filters, logging, cwd, the
    environment, signal handlers, PIL limits and matplotlib's backend. The first call imports what the
    function needs (third-party imports change some of these themselves: sklearn sets KMP_* variables,
    sympy adds a warnings filter); the second is compared. The torch stream goes on from the caller's
    seed (pretrain, finetune and eval linear reseeded it for their weights): a DataLoader draws its
    workers' base seed from it, as in any PyTorch code, so the two seeds' next draws must differ."""
    CALLS[name](0, **inputs)
    before = global_state()
    torch.manual_seed(1)
    CALLS[name](1, **inputs)
    after_seed_1 = torch.rand(4)
    after = global_state()
    assert {k: v for k, v in after.items() if v != before[k]} == {}
    torch.manual_seed(2)
    CALLS[name](2, **inputs)
    assert not torch.equal(torch.rand(4), after_seed_1)


def test_predict_classification_writes_under_out_and_never_over_a_file_of_the_users(inputs, tmp_path, monkeypatch):
    """The default out was predictions.csv in the current folder (the other predict commands write under
    out/predict-<task>), and any existing out file, a user's data.csv, was replaced silently."""
    root = inputs["root"]
    monkeypatch.chdir(tmp_path)
    written = dinokit.predict_classification(head=root / "lin", images=root / "val", num_workers=0)
    assert Path(written) == Path("out/predict-classification/predictions.csv") and Path(written).is_file()
    assert not Path("predictions.csv").exists()
    dinokit.predict_classification(head=root / "lin", images=root / "val", num_workers=0)  # its own: replaced
    for name, text in (("data.csv", "id,label\n1,cat\n"), ("results.json", '{"top1": 71.2}\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(DinokitError, match=f"out={tmp_path / name} exists and is not a predictions file"):
            dinokit.predict_classification(head=root / "lin", images=root / "val", out=tmp_path / name)
        assert (tmp_path / name).read_text() == text
    dinokit.predict_classification(head=root / "lin", images=root / "val", out=tmp_path / "p.json", num_workers=0)
    dinokit.predict_classification(head=root / "lin", images=root / "val", out=tmp_path / "p.json", num_workers=0)


def test_predict_classification_refuses_a_json_list_of_records_that_are_not_predictions(inputs, tmp_path):
    """A user's JSON list of {"path": ..., "label": ...} records (a manifest, a labels file) was taken as
    an earlier predictions file, as only "path" was looked for, and replaced: a predictions file's
    records hold "path" and "predictions", and nothing else."""
    root, out = inputs["root"], tmp_path / "labels.json"
    text = '[\n  {\n    "path": "a.png",\n    "label": "cat"\n  }\n]\n'
    out.write_text(text)
    with pytest.raises(DinokitError, match="exists and is not a predictions file"):
        dinokit.predict_classification(head=root / "lin", images=root / "val", out=out, num_workers=0)
    assert out.read_text() == text


def test_predict_classification_refuses_a_csv_whose_header_only_begins_as_its_own(inputs, tmp_path):
    """A CSV was taken as an earlier predictions file when its first line began with
    'path,class,probability', so a user's table headed path,class,probability_human,notes was replaced;
    a predictions file's header is path, then class / probability pairs (class_2, probability_2, ...)."""
    root, out = inputs["root"], tmp_path / "annotations.csv"
    text = "path,class,probability_human,notes\na.png,cat,0.9,checked by hand\n"
    out.write_text(text)
    with pytest.raises(DinokitError, match="exists and is not a predictions file"):
        dinokit.predict_classification(head=root / "lin", images=root / "val", out=out, num_workers=0)
    assert out.read_text() == text
    keys = dict(head=root / "lin", images=root / "val", out=tmp_path / "p.csv", num_workers=0)
    for k in (1, 3):  # its own, of any k: replaced
        dinokit.predict_classification(**keys, k=k)
        dinokit.predict_classification(**keys)


class Reached(Exception):
    """The model was called."""


@pytest.mark.parametrize("helper", ["attention_maps", "patch_features"])
def test_the_map_helpers_move_the_image_to_the_models_device_and_name_what_it_cannot_take(micro, helper):
    """A CPU image from eval_transform and a model on a GPU gave PyTorch's device mismatch (the helpers
    return CPU arrays but did not move their input); a PIL image gave AttributeError 'no attribute ndim'.
    The meta device stands in for the GPU: the model then sees the image there."""
    call = {
        "attention_maps": lambda m, x: dinokit.attention_maps(m, x),
        "patch_features": lambda m, x: dinokit.patch_features(m, [x]),
    }[helper]
    with pytest.raises(ModelInputError, match=r"PIL\.Image\.Image"):
        call(micro, photo())
    elsewhere = dinokit.create_model("vit_micro_p4").to("meta").eval()
    seen = []

    def spy(x, *args, **kwargs):
        seen.append(x.device)
        raise Reached  # the forward itself cannot run on meta tensors' values

    elsewhere.get_last_selfattention = elsewhere.forward_features = spy
    with pytest.raises(Reached):
        call(elsewhere, torch.randn(3, 32, 32))
    assert seen == [torch.device("meta")]


def test_extract_features_gives_the_model_back_in_its_mode_and_runs_half_models(inputs):
    """extract_features left a model being trained in eval mode (its dropout and drop path off for the
    rest of the user's training), and a model.half() failed under its default bf16 autocast with
    'Unexpected floating ScalarType in at::autocast::prioritize'."""
    paths, transform = inputs["paths"], inputs["transform"]
    model = dinokit.create_model("vit_nano_p2", drop_path_rate=0.5)
    model.load_state_dict(inputs["model"].state_dict())
    keys = dict(which=["cls", "layers"], layers=[0, 1], num_workers=0, progress=False, precision="fp32")
    feats, kept, _ = dinokit.extract_features(model.train(), paths, transform, **keys)
    assert model.training and all(block.training for block in model.blocks)
    reference, _, _ = dinokit.extract_features(inputs["model"], paths, transform, **keys)  # eval: no drop path
    assert torch.equal(feats["cls"], reference["cls"]) and torch.equal(feats["layers"], reference["layers"])
    half = dinokit.create_model("vit_nano_p2").eval()
    half.load_state_dict(inputs["model"].state_dict())
    half_feats, half_kept, _ = dinokit.extract_features(half.half(), paths, transform, **{**keys, "precision": "bf16"})
    assert half_kept == kept and half_feats["cls"].dtype == torch.float32
    torch.testing.assert_close(half_feats["cls"], reference["cls"], rtol=0, atol=2e-2)


def test_the_demos_loss_plot_leaves_matplotlibs_backend_and_figures_alone(tmp_path):
    """dinokit.demo's plot_losses called matplotlib.use("Agg"): in a notebook, plt.show() then showed
    nothing for the rest of the session. It now draws on a Figure of its own, not through pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from dinokit.demo import plot_losses

    prior = dict.__getitem__(matplotlib.rcParams, "backend")
    matplotlib.use("pdf")  # stands for the notebook's own (inline, qt, ...)
    try:
        figures = plt.get_fignums()
        rows = [{"iteration": i, "loss": 1.0 / (i + 1), "dino_loss": 0.5} for i in range(3)]
        knn = [{"iteration": 2, "knn_top1": 40.0}]
        plot_losses(rows, tmp_path / "loss.png", knn_rows=knn, references={"random": 20.0})
        assert Image.open(tmp_path / "loss.png").size == (1210, 385)  # 11 x 3.5 inches at 110 dpi
        assert (matplotlib.get_backend(), plt.get_fignums()) == ("pdf", figures)
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", prior)


def test_paths_under_the_home_folder_are_expanded_as_load_model_and_list_images_do(inputs, tmp_path, monkeypatch):
    """dinokit.embed(out="~/emb") and build_index(out="~/photos.index") wrote a folder named '~' in the
    current folder (a notebook has no shell to expand it), and read_embeddings / search_index read
    '~/...' there; load_model, list_images and predict already expanded '~'."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    dinokit.export_model(inputs["model"], "~/nano.safetensors")
    keys = dict(image_size=16, num_workers=0, progress=False)
    dinokit.embed(model="~/nano.safetensors", data=inputs["root"] / "val", out="~/emb", **keys)
    feats, paths = dinokit.read_embeddings("~/emb")
    dinokit.build_index(features="~/emb", out="~/photos.index")
    (hits,) = dinokit.search_index("~/photos.index", paths[0], k=1)
    assert hits["hits"][0]["path"] == paths[0] and len(paths) == feats["cls"].shape[0] == 8
    assert (home / "emb" / "manifest.json").is_file() and (home / "photos.index" / "index.json").is_file()
    assert list(elsewhere.iterdir()) == []


def test_every_command_writes_an_out_under_the_home_folder_there(inputs, tmp_path, monkeypatch):
    """The commands that dropped prepare_output's expanded path wrote out="~/..." into a folder named '~'
    in the current folder: eval knn / linear, visualize *, segment, track, index search's out= and
    sheet=. Here one of each way of writing: a folder, a PNG, a JSON beside a sheet."""
    from dinokit.eval.classification import eval_knn, eval_linear
    from dinokit.maps.commands import visualize_attention
    from dinokit.retrieval.commands import index_search

    root, elsewhere = inputs["root"], tmp_path / "cwd"
    home = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    keys = dict(model=inputs["weights"], train=root / "train", val=root / "val", image_size=16, num_workers=0)
    eval_knn(out="~/knn", **keys)
    eval_linear(out="~/lin", epochs=1, learning_rates=[0.1], precision="fp32", **keys)
    visualize_attention(model=inputs["weights"], image=inputs["paths"][0], out="~/attention.png", image_size=16)
    index_search(root / "val.index", inputs["paths"][0], k=1, out="~/hits.json", sheet="~/hits.png")
    assert list(elsewhere.iterdir()) == []
    written = ["attention.png", "hits.json", "hits.png", "knn/knn.json", "lin/linear.json"]
    assert [name for name in written if not (home / name).is_file()] == []


def test_curation_reads_an_embedding_under_the_home_folder(inputs, tmp_path, monkeypatch):
    """curate dedup / cluster (features="~/emb" from Python) read the manifest under the home folder but
    its shards from '~/emb/shard_...' in the current folder: "shard_00000.safetensors is missing"."""
    from dinokit.curation.commands import cluster, dedup

    monkeypatch.setenv("HOME", str(inputs["root"]))
    monkeypatch.chdir(tmp_path)
    dedup(features="~/emb", out=tmp_path / "dd")
    cluster(features="~/emb", out=tmp_path / "cl", n_clusters=[2])
    kept = (tmp_path / "dd" / "kept.txt").read_text().splitlines()  # a random init: near-duplicates all
    assert kept and set(kept) <= {str(p) for p in inputs["paths"]} and (tmp_path / "cl").is_dir()


def test_attention_probabilities_are_float32_under_a_callers_autocast(micro):
    """get_selfattention says 'computed explicitly in float32', but under torch.autocast its q @ k^T
    ran in bf16 and the probabilities came back bf16 (rows summing to 1 only to ~1e-2)."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = micro.get_last_selfattention(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn = micro.get_last_selfattention(x)
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(attn, reference, rtol=0, atol=2e-2)  # the blocks before still ran in bf16


def test_eval_transform_turns_a_pil_image_by_its_exif_orientation_as_embed_does(tmp_path):
    """A phone photo from Image.open (EXIF Orientation 6: stored on its side) went through the transform
    as stored, where embed and the evals open the file upright (`open_rgb`): features of the same photo
    differed between a notebook and `dinokit embed`."""
    from dinokit.data.images import open_rgb

    pixels = np.random.default_rng(2).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    transform = dinokit.eval_transform(16, resize_policy="resize", patch_size=4)
    as_embed_opens_it = transform(open_rgb(tmp_path / "phone.png"))
    with Image.open(tmp_path / "phone.png") as opened:
        assert opened.size == (24, 40)  # stored on its side
        assert torch.equal(transform(opened), as_embed_opens_it)
    assert transform(Image.fromarray(pixels)).shape == as_embed_opens_it.shape
    assert not torch.equal(transform(Image.fromarray(pixels)), as_embed_opens_it)  # as stored: other pixels
