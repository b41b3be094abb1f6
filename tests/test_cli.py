import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GPU_OUT_OF_MEMORY, random_images

import dinokit
from dinokit.cli import (
    COMMAND_KEYS,
    COMMANDS,
    FURTHER_KEYS,
    build_kwargs,
    command_help,
    describe_out_of_memory,
    explained_keys,
    main,
    parse_value,
    resolve_command,
)
from dinokit.errors import DinokitError


def example(
    model: str,
    steps: int = 10,
    lr: float = 1e-3,
    flag: bool = False,
    sizes: list[int] | None = None,
    name: str | None = None,
    out: Path = Path("out"),
):
    """An example command."""
    return locals()


def test_values_are_converted_to_the_annotated_types():
    kw = build_kwargs(
        example,
        ["model=dinov2_vits14", "steps=20", "lr=3e-4", "flag=true", "sizes=[224, 448]", "name=none", "out=runs/a"],
    )
    assert kw == {
        "model": "dinov2_vits14",
        "steps": 20,
        "lr": 3e-4,
        "flag": True,
        "sizes": [224, 448],
        "name": None,
        "out": Path("runs/a"),
    }
    assert build_kwargs(example, ["model=001", "sizes=1,2"]) == {"model": "001", "sizes": [1, 2]}
    assert parse_value("1", bool) is True
    with pytest.raises(ValueError):
        parse_value("2.5", int)
    with pytest.raises(ValueError):
        parse_value("maybe", bool)
    with pytest.raises(ValueError) as err:  # image_size: int | list[int] said it twice
        parse_value("abc", int | list[int])
    assert str(err.value) == "expected a number, got 'abc'"
    with pytest.raises(ValueError) as err:  # max_matches=all: the value for "no limit" is named
        parse_value("all", int | None)
    assert str(err.value) == "expected a number, got 'all' (or none)"


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(DinokitError, match="Did you mean steps"):
        build_kwargs(example, ["model=a", "stepz=3"])
    with pytest.raises(DinokitError, match=r"missing required key.*model="):
        build_kwargs(example, ["steps=3"])
    with pytest.raises(DinokitError, match="bad value for steps"):
        build_kwargs(example, ["model=a", "steps=many"])
    with pytest.raises(DinokitError, match="expected key=value"):
        build_kwargs(example, ["model"])


def test_yaml_config_supplies_keys_and_explicit_pairs_win(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: dinov2_vitb14\nsteps: 7\nlr: 0.01\n")
    kw = build_kwargs(example, [f"config={cfg}", "steps=9"])
    assert kw == {"model": "dinov2_vitb14", "steps": 9, "lr": 0.01}
    cfg.write_text("modle: x\n")
    with pytest.raises(DinokitError, match="unknown key 'modle'"):
        build_kwargs(example, [f"config={cfg}"])


def test_every_registered_command_resolves_and_has_a_docstring():
    for name in COMMANDS:
        func = resolve_command(name)
        assert func.__doc__, name


def test_main_help_gives_each_command_a_whole_sentence(capsys):
    """`dinokit --help` showed demo as 'Pretrain on rendered shapes ... (default: the preset's max_minutes),'
    (its docstring's first line, cut mid-sentence)."""
    assert main(["--help"]) == 0
    summaries = capsys.readouterr().out.split("commands:\n")[1].splitlines()
    assert summaries and all(line.rstrip().endswith(".") for line in summaries), summaries


def test_main_help_export_and_info(tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "export" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0
    assert "format" in capsys.readouterr().out
    m = dinokit.create_model("vit_nano_p2")
    src = dinokit.export_model(m, tmp_path / "m.safetensors")
    assert main(["export", f"model={src}", f"out={tmp_path / 'hf'}", "format=hf"]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    capsys.readouterr()
    assert main(["info", f"model={tmp_path / 'hf'}"]) == 0
    assert '"format": "hf"' in capsys.readouterr().out
    assert main(["export", "model=/nonexistent.pth", "out=x"]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(["exprot"]) == 2
    assert "Did you mean export" in capsys.readouterr().err


def test_a_command_group_word_alone_names_every_command_of_the_group(capsys):
    """`dinokit predict` suggested predict depth alone, `dinokit eval` eval knn alone (difflib's close
    matches): a group word lists all its commands."""
    for group in ("eval", "predict", "index", "visualize", "curate"):
        assert main([group, "--help"]) == 2
        err = capsys.readouterr().err
        for name in (n for n in COMMANDS if n.startswith(group + " ")):
            assert name in err, (group, err)
        assert f"'{group}' is a group of commands; name one" in err and "unknown command" not in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dinokit", "models"], capture_output=True, text=True, check=True)
    assert "dinov2_vitg14_reg" in out.stdout and "1,136,486,912" in out.stdout
    assert torch.__version__


def test_installed_console_script_lists_the_commands():
    script = Path(sys.executable).parent / "dinokit"
    if not script.is_file():
        pytest.skip(f"no installed `dinokit` script beside {sys.executable} (install the package with pip -e .)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, timeout=300)
    assert "commands:" in out.stdout
    for name in ("models", "info", "export"):
        assert f"\n  {name} " in out.stdout, name


def test_yaml_values_are_converted_like_command_line_values(tmp_path):
    def command(
        temperature: float = 0.07,
        ks: list[int] = [10],  # noqa: B006
        features: list[str] = ("cls",),
        image_size: int | list[int] = 224,
        few_shot: list[int] | None = None,
        flag: bool = False,
        name: str = "x",
    ):
        """A command with the key types of the real ones."""

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        'temperature: 7e-2\nks: 10\nfeatures: cls\nimage_size: "32"\nfew_shot: [1, "5"]\nflag: "yes"\nname: 001\n'
    )
    kw = build_kwargs(command, [f"config={cfg}"])
    assert kw == {
        "temperature": 0.07,
        "ks": [10],
        "features": ["cls"],
        "image_size": 32,
        "few_shot": [1, 5],
        "flag": True,
        "name": "1",
    }
    assert type(kw["temperature"]) is float and type(kw["image_size"]) is int
    assert build_kwargs(command, [f"config={cfg}", "ks=[10, 20]"])["ks"] == [10, 20]
    cfg.write_text("image_size: [32, 48]\nfew_shot: null\ntemperature: 1\n")
    assert build_kwargs(command, [f"config={cfg}"]) == {"image_size": [32, 48], "few_shot": None, "temperature": 1.0}
    for bad in ("ks: many", "temperature: warm", "flag: 2", "name: [a]"):
        cfg.write_text(bad + "\n")
        key = bad.split(":")[0]
        with pytest.raises(DinokitError, match=rf"bad value for {key} in .*run\.yaml"):
            build_kwargs(command, [f"config={cfg}"])


def test_pretrain_yaml_keys_reach_the_config_typed(tmp_path):
    from dinokit.train.config import resolve_config
    from dinokit.train.pretrain import pretrain

    cfg = tmp_path / "run.yaml"
    cfg.write_text('data: images\nmax_iterations: "2"\nepochs: 1e0\nlr: 4e-3\nglobal_crops_scale: [0.3, "1"]\n')
    kw = build_kwargs(pretrain, [f"config={cfg}"])
    assert kw["max_iterations"] == 2 and kw["epochs"] == 1.0  # named keys: converted here
    config = resolve_config("cpu32", {k: v for k, v in kw.items() if k != "data"})  # the others: by the config
    assert (config.max_iterations, config.epochs, config.lr, config.global_crops_scale) == (2, 1.0, 0.004, [0.3, 1.0])


def test_a_bad_pretraining_value_names_the_type_as_help_shows_it():
    """lr=abc said 'expected <class 'float'>' (a Python repr) where --help says float."""
    from dinokit.train.config import resolve_config

    with pytest.raises(DinokitError, match=r"bad value for lr: expected float, got 'abc'$"):
        resolve_config("cpu32", {"lr": "abc"})
    with pytest.raises(DinokitError, match=r"bad value for max_iterations: expected int \| None, got 'x'$"):
        resolve_config("cpu32", {"max_iterations": "x"})


def test_a_runs_config_yaml_is_a_preset_and_a_config_file(tmp_path):
    """config.yaml of a run (the full resolved configuration) was refused both as preset= and as config=:
    its run facts (data, out, preset, derived) were unknown pretraining keys."""
    from dinokit.train.config import resolve_config, save_config
    from dinokit.train.pretrain import pretrain

    ran = resolve_config("cpu32", {"lr": 0.002})
    saved = tmp_path / "config.yaml"
    saved.write_text(save_config(ran, {"data": "images", "out": "run", "preset": "cpu32", "derived": {"images": 3}}))
    assert resolve_config(str(saved), {}) == ran
    kw = build_kwargs(pretrain, [f"config={saved}", "out=run2"])
    named = ("data", "out", "preset")
    assert resolve_config(kw["preset"], {k: v for k, v in kw.items() if k not in named}) == ran


@pytest.mark.parametrize(
    "command, out, keys",
    [
        ("eval knn", "afile", ["model=m.pth", "train=t", "val=v"]),
        ("eval linear", "afile", ["model=m.pth", "train=t", "val=v"]),
        ("embed", "afile", ["model=m.pth", "data=d"]),
        ("pretrain", "afile", ["data=d", "preset=cpu32"]),
        ("index build", "afile", ["features=emb"]),
        ("index search", "folder", ["index=idx", "query=q.jpg"]),
        ("index search", "folder", ["index=idx", "query=q.jpg", "sheet={tmp}/folder"]),
        ("visualize attention", "folder", ["model=m.pth", "image=a.jpg"]),
        ("visualize pca", "folder", ["model=m.pth", "image=a.jpg"]),
        ("visualize similarity", "folder", ["model=m.pth", "image=a.jpg", "x=1", "y=1"]),
        ("segment", "afile", ["model=m.pth", "reference=a.jpg", "reference_mask=m.png", "target=t"]),
    ],
)
def test_out_of_the_wrong_kind_fails_before_any_work(tmp_path, capsys, command, out, keys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("in the way")
    keys = [k.format(tmp=tmp_path) for k in keys]
    out_key = [] if any(k.startswith("sheet=") for k in keys) else [f"out={tmp_path / out}"]
    assert main([*command.split(), *keys, *out_key]) == 2
    kind = "an existing file" if out == "afile" else "an existing folder"
    err = capsys.readouterr().err
    assert f"dinokit: error: cannot write to {tmp_path / out}: it is {kind}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]


def test_file_system_errors_are_one_line_without_a_traceback(monkeypatch, capsys):
    def failing(error):
        def command(out: str = "x"):
            """A command that fails writing."""
            raise error

        return command

    rename = IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/.a.tmp1", None, "/runs/a")
    monkeypatch.setattr("dinokit.cli.resolve_command", lambda name: failing(rename))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == "dinokit: error: Is a directory (/runs/a): a folder is where a file is to be written: " + (
        "pass a file path, or remove the folder\n"
    )
    monkeypatch.setattr("dinokit.cli.resolve_command", lambda name: failing(PermissionError(13, "Permission denied")))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "dinokit: error: [Errno 13] Permission denied\n"
    monkeypatch.setattr("dinokit.cli.resolve_command", lambda name: failing(KeyboardInterrupt()))
    assert main(["models"]) == 130


def test_an_interrupted_torchrun_job_says_so_once(monkeypatch, capsys):
    """Ctrl-C under torchrun printed `dinokit: interrupted` once per process: process 0 prints it, the
    others exit with the same status quietly."""

    def interrupted(out: str = "x"):
        """A command stopped by Ctrl-C."""
        raise KeyboardInterrupt

    monkeypatch.setattr("dinokit.cli.resolve_command", lambda name: interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "dinokit: interrupted\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, err in (("0", "dinokit: interrupted\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert main(["models"]) == 130
        assert capsys.readouterr().err == err


def test_pretrain_help_lists_every_config_key_with_type_and_default(capsys):
    import dataclasses

    from dinokit.train.config import PretrainConfig

    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    further = out.split("further keys")[1]
    for f in dataclasses.fields(PretrainConfig):
        assert re.search(rf"^  {f.name} +\S.* = ", further, re.M), f.name
    assert re.search(r"^  lr +float += 0\.004  # peak lr after warm-up, .*\(official: optim\.base_lr\)$", further, re.M)
    assert re.search(r"^  global_crops_scale +list\[float\] += \[0\.32, 1\.0\]  # \[min, max\] area", further, re.M)
    assert re.search(r"^  centering +str += 'ema'  # the teacher's targets: ema .*\| sinkhorn_knopp ", further, re.M)
    assert further.index(" optimisation") < further.index("  lr ") < further.index(" runtime")
    assert "further keys are passed on" not in out


def test_a_command_exits_without_collecting_its_objects_again():
    """A command's process spent 0.5-0.6 s of its exit in the interpreter's last garbage collections over
    every object of torch, torch._dynamo and sympy (1.5 s for each torchrun process on two shared cores):
    main now has them frozen at exit (cli.skip_the_last_collections_at_exit). The probe's own exit
    handler, registered first, runs last: after main's."""
    code = "import atexit, gc; atexit.register(lambda: print(gc.get_freeze_count() > 0)); "
    code += "from dinokit.cli import main; main(['--version'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["dinokit", dinokit.__version__, "True"], done.stdout


def test_version_and_a_closed_output_pipe(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dinokit {dinokit.__version__}\n"
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `dinokit models | head -1` once head has exited
    try:
        command = [sys.executable, "-m", "dinokit", "models"]
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")


def test_the_help_page_reads_summaries_without_importing_the_commands():
    """`dinokit --help` imported every command module (torchvision, the trainer, faiss): 6 s for a page."""
    import inspect
    import subprocess
    import sys

    from dinokit.cli import COMMANDS, resolve_command, summary_line

    for name in COMMANDS:
        assert summary_line(name) == inspect.getdoc(resolve_command(name)).splitlines()[0], name
    heavy = "[m for m in ('torchvision', 'dinokit.train', 'faiss') if m in sys.modules]"
    code = f"import sys; from dinokit.cli import main_help; main_help(); print({heavy})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def help_key_lines(name: str) -> list[str]:
    """The lines of `dinokit <name> --help` under `keys:`, one per key of the command's function."""
    page = command_help(name, resolve_command(name))
    return page.split("\nkeys:\n")[1].split("\n\n")[0].splitlines() if "\nkeys:\n" in page else []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_gives_every_key_a_meaning(name):
    """--help listed eval linear's selection_fraction, refit, ... with a type and default and nothing
    saying what they are: every key now has a one-line meaning, or 'see above' where the docstring
    printed above it explains it with a `key:` label."""
    for line in help_key_lines(name):
        assert re.search(r"  # \S", line), f"dinokit {name} --help: {line.strip()}"


@pytest.mark.parametrize("name", list(FURTHER_KEYS))
def test_help_gives_every_config_key_a_meaning(name):
    """`dinokit pretrain --help` listed 58 of PretrainConfig's 84 keys (distill_from, drop_path_rate,
    student_temp, center_momentum, ...) and `dinokit finetune --help` 11 of FinetuneConfig's 32 with a
    type and default and nothing saying what they are: every field now has a one-line meaning (its
    inline comment in the dataclass's source)."""
    import dataclasses
    import importlib

    module, cls = FURTHER_KEYS[name].split(":")
    fields = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))]
    further = command_help(name, resolve_command(name)).split("\nfurther keys")[1]
    lines = {line.split()[0]: line for line in further.splitlines() if line.startswith("  ")}
    assert set(fields) <= set(lines)
    without = [key for key in fields if not re.search(r"  # \S", lines[key])]
    assert not without, f"dinokit {name} --help shows no meaning for {without}"


def test_help_meanings_name_keys_that_exist():
    for name, meanings in COMMAND_KEYS.items():
        keys = {line.split()[0] for line in help_key_lines(name)}
        assert set(meanings) <= keys, (name, sorted(set(meanings) - keys))


def test_help_shows_required_keys_defaults_and_meanings():
    lines = {line.split()[0]: line for line in help_key_lines("eval linear")}
    assert re.fullmatch(r"  train +str +\(required\)  # labelled .*", lines["train"])
    assert re.fullmatch(r"  val +str +\(required\)  # see above", lines["val"])
    selection = lines["selection_fraction"]
    assert re.fullmatch(r"  selection_fraction +float += 0\.1  # share of each train class .*", selection)
    assert re.fullmatch(r"  device +str += 'auto'  # auto \(a GPU .*", lines["device"])
    embed = {line.split()[0]: line for line in help_key_lines("embed")}
    assert "= ['cls']" in embed["features"]  # a tuple default shown as the list one would type


def test_explained_keys_reads_the_labels_of_a_docstring():
    doc = "Title.\n\nmodel: a file. train, val: folders. nprobe (ivf: cells) / ef_search (hnsw): effort.\nk:\n a number"
    assert explained_keys(doc) == {"model", "train", "val", "nprobe", "ef_search", "k"}
    assert explained_keys("the key model: is not a label mid-sentence") == set()


def test_a_missing_key_names_the_help_page_of_its_command(capsys):
    """'missing required key(s): val=...' did not say where the keys are explained."""
    assert main(["eval", "knn", "model=m", "train=t"]) == 2
    assert capsys.readouterr().err == (
        "dinokit: error: missing required key(s): val=... (`dinokit eval knn --help` says what each key is)\n"
    )
    assert main(["eval", "knn", "model=m", "train"]) == 2
    assert "got 'train' (see `dinokit eval knn --help`)" in capsys.readouterr().err


@pytest.fixture
def embed_keys(tmp_path):
    """`dinokit embed` keys for two tiny images and a one-block model."""
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), tmp_path / "m.safetensors")
    random_images(tmp_path / "images", 2, 20, np.random.default_rng(0))
    keys = [f"model={weights}", f"data={tmp_path / 'images'}", f"out={tmp_path / 'e'}", "image_size=16"]
    return [*keys, "batch_size=8", "num_workers=0", "progress=false", "device=cpu"]


def test_one_image_the_device_has_no_memory_for_is_one_line_naming_the_device_sizes_and_the_keys(
    embed_keys, memory_fits, capsys
):
    """Torch's multi-screen traceback was all a user got; the batch is halved down to one image first."""
    tried = memory_fits(0)
    assert main(["embed", *embed_keys]) == 2
    assert capsys.readouterr().err == (
        "dinokit: error: out of memory on cuda:0 (tried to allocate 2.00 GiB, 1.25 GiB free); to use less: "
        "lower batch_size (now 8), image_size (now 16)\n"
    )
    assert tried == [2, 1]


def test_the_cpu_allocator_failing_is_one_line_without_a_smaller_batch(embed_keys, memory_fits, monkeypatch, capsys):
    failure = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)"
    )
    tried = memory_fits(1, failure)
    keys = [*embed_keys, "precision=fp32"]
    assert main(["embed", *keys]) == 2
    assert capsys.readouterr().err == (
        "dinokit: error: out of memory on cpu (tried to allocate 3.00 GiB); to use less: lower batch_size (now 8), "
        "image_size (now 16); set precision=bf16\n"
    )
    assert tried == [2]  # not halved: the machine itself is short of memory
    memory_fits(1, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # not memory: the traceback
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["embed", *keys])


def test_out_of_memory_names_the_keys_that_lower_memory_which_the_command_has():
    """Derived from the command's signature and config dataclass: pretrain's crops and fsdp, not embed's."""
    error = torch.OutOfMemoryError(GPU_OUT_OF_MEMORY)
    pretrain = describe_out_of_memory(error, "pretrain", resolve_command("pretrain"), {"batch_size": 64})
    assert pretrain.startswith(
        "out of memory on cuda:0 (tried to allocate 2.00 GiB, 1.25 GiB free); to use less: lower batch_size (now "
        "64), global_crops_size, local_crops_size, local_crops_number; set precision=bf16"
    )
    assert "fsdp=true" in pretrain and "activation_checkpointing=true" in pretrain
    finetune = describe_out_of_memory(error, "finetune", resolve_command("finetune"), {"precision": "bf16"})
    assert "lower batch_size, image_size" in finetune and "crops" not in finetune and "fsdp" not in finetune
    assert "activation_checkpointing=true" in finetune
    given = {"activation_checkpointing": True}  # already on: not suggested
    assert "activation_checkpointing" not in describe_out_of_memory(
        error, "pretrain", resolve_command("pretrain"), given
    )
    assert "precision" not in finetune  # already bf16
    dedup = describe_out_of_memory(error, "curate dedup", resolve_command("curate dedup"), {})
    assert dedup.endswith("to use less: set device=cpu")
