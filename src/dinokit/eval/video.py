"""`dinokit eval video`: DINO's DAVIS-2017 video object segmentation benchmark over a whole dataset.

DINO v1 (`eval_video_segmentation.py`) tracks each val sequence from its first frame's annotation by
label propagation of frozen patch features (maps/tracking.py), writes the masks as DAVIS results
(<out>/<sequence>/<frame>.png, palette PNGs) and scores them with davis2017-evaluation (semi-supervised:
every frame but the first and last, per object J and F, then mean, recall and decay per object and
their means over all objects of all sequences; eval/metrics.py). This command does both in one run.

The DAVIS-2017 layout (davis2017-evaluation's reader), under data=:
    JPEGImages/<resolution>/<sequence>/<frame>.jpg    the frames, in name order
    Annotations/<resolution>/<sequence>/<frame>.png   palette masks: 0 background, 1..N objects, 255 void
    ImageSets/2017/<split>.txt                         the split's sequence names, one a line

Frame preprocessing: preprocessing=dino is DINO's `read_frame` (the short side to image_size = 480, the
long side to the aspect-kept length floored to a multiple of 64, bilinear without antialiasing, 8-bit,
mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225)), the input then cut to whole patches at its
bottom and right edges as DINO's patch embedding does: the protocol behind DINO's published numbers, up
to OpenCV's fixed-point rounding of the resize (at most one grey level, docs/benchmarks.md). preprocessing=dinokit is
the maps commands' (bicubic with antialiasing, std 0.229, the long side rounded to whole patches).

Resumable: each sequence's scores are written (<out>/<sequence>/scores.json, atomically) when its last
mask is; a rerun into the same out keeps the finished sequences (of the same model and settings, else
it is refused) and starts at the first unfinished one. A finished sequence whose frames or annotations
changed since (names, sizes, modification times) is tracked again. One run at a time per out folder.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dinokit.data.images import files_under, open_rgb, upright_size
from dinokit.errors import DinokitError
from dinokit.io import (
    file_stamps,
    folder_lock,
    prepare_output,
    read_json,
    refuse_other_outputs,
    refuse_overwriting_inputs,
    write_json,
)
from dinokit.maps.track_command import check_frame_sizes, check_settings, read_first_mask, track_frames
from dinokit.maps.tracking import VOID

if TYPE_CHECKING:  # torchvision, scipy and scikit-image are imported where they are used: not for `--help`
    from torchvision.transforms import v2

PREPROCESSINGS = ("dino", "dinokit")
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # DINO's color_normalize
SCORES = "scores.json"  # per sequence, beside its masks: the sequence is finished
FILES = "files_sha256"  # scores.json's hash of the files it was scored on (sequence_files_hash)


@dataclass
class Sequence:
    name: str
    frames: list[Path]  # JPEGImages/<resolution>/<name>/*.jpg, in name order
    annotations: Path  # Annotations/<resolution>/<name>
    size: tuple[int, int]  # (H, W) of every frame and annotation


class DinoFrameTransform(torch.nn.Module):
    """PIL RGB image -> (3, H, W) input as DINO's eval_video_segmentation `read_frame`, cut to whole
    `patch_size` patches (bottom and right), which is what DINO's patch embedding reads of it."""

    def __init__(self, short_side: int, patch_size: int) -> None:
        super().__init__()
        self.short_side, self.patch_size = short_side, patch_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) resized, DINO's rule: the short side (the height where width >= height) to short_side,
        the other to its aspect-kept length floored to a multiple of 64."""
        s = self.short_side
        if height > width:
            return int((s * height / width) // 64 * 64), s
        return s, int((s * width / height) // 64 * 64)

    def forward(self, picture) -> torch.Tensor:
        rgb = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        h, w = self.output_size(*rgb.shape[-2:])
        if min(h, w) < self.patch_size:
            raise DinokitError(
                f"a {rgb.shape[2]}x{rgb.shape[1]} frame resized by DINO's rule (short side {self.short_side}, long "
                f"side floored to a multiple of 64) is {w}x{h}, less than a patch: pass a larger image_size"
            )
        x = F.interpolate(rgb[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]
        x = x.round().clamp(0, 255) / 255  # OpenCV's resize of an 8-bit image stays 8-bit
        x = (x - torch.tensor(DINO_MEAN)[:, None, None]) / torch.tensor(DINO_STD)[:, None, None]
        p = self.patch_size
        return x[:, : h // p * p, : w // p * p]

    def __repr__(self) -> str:
        return (
            f"DinoFrameTransform(short_side={self.short_side}, long side floored to a multiple of 64, bilinear "
            f"without antialias, 8-bit, mean {DINO_MEAN} std {DINO_STD}, cut to whole {self.patch_size}-px patches)"
        )


def check_preprocessing(preprocessing: str) -> None:
    if preprocessing not in PREPROCESSINGS:
        raise DinokitError(
            f"preprocessing must be dino (DINO's read_frame: the published numbers' protocol) or dinokit (the maps "
            f"commands' resize and normalisation), got {preprocessing!r}"
        )


def frame_transform(preprocessing: str, image_size: int, patch_size: int) -> "v2.Compose":
    """The frames' transform (PIL RGB -> (3, H, W)) of `preprocessing` (dino or dinokit)."""
    from torchvision.transforms import v2

    from dinokit.data.transforms import check_image_size, eval_transform

    check_preprocessing(preprocessing)
    if preprocessing == "dino":
        if image_size < patch_size:
            raise DinokitError(f"image_size {image_size} is less than the patch size {patch_size}: DINO uses 480")
        return v2.Compose([DinoFrameTransform(image_size, patch_size)])
    check_image_size(image_size, patch_size)  # its error names the nearest valid sizes
    # no ReducedJpegDecode: FrameFiles decodes each frame whole (its pixels are drawn and scored)
    return eval_transform(image_size, "aspect", patch_size=patch_size, reduced_decode=False)


class FrameFiles(Dataset):
    """(RGB (H, W, 3) uint8, model input (3, H', W')) of each frame file, for a DataLoader's workers."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        picture = open_rgb(self.paths[i])
        return np.array(picture), self.transform(picture)


def split_sequences(data: str, split: str, resolution: str, sequences: str | list[str] | None) -> list[Sequence]:
    """The sequences of `split` (or the listed `sequences` of it), every file checked before any work:
    frames (one size a sequence, from their headers), the first frame's annotation and those of every
    scored frame (all but the first and last), of the frames' size."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DinokitError(
            f"data={data} is not a folder: pass the DAVIS-2017 folder (holding JPEGImages, Annotations and "
            "ImageSets), downloaded from https://davischallenge.org/davis2017/code.html (TrainVal, 480p)"
        )
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise DinokitError(
            f"{listing} is missing: data= must be the DAVIS-2017 folder holding ImageSets/2017/<split>.txt (the "
            f"TrainVal download has train.txt and val.txt); check data= and split={split}"
        )
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    crafted = [n for n in names if Path(n).name != n or n in (".", "..") or "\\" in n]
    if crafted:  # each name becomes a folder under out=: none may lead out of it
        raise DinokitError(
            f"{listing} names the sequence {crafted[0]!r}, not a folder name (DAVIS's are such as bear, "
            "bike-packing): each becomes a folder under out=, which it would leave; fix the list"
        )
    if sequences is not None:
        wanted = [s.strip() for s in (sequences.split(",") if isinstance(sequences, str) else sequences)]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise DinokitError(
                f"sequences={','.join(unknown)} not in {listing} ({len(names)} sequences, e.g. "
                f"{', '.join(names[:3])}): name sequences of split={split}"
            )
        names = [s for s in names if s in wanted]
    if not names:
        raise DinokitError(f"{listing} lists no sequence: it names one sequence a line")
    return [davis_sequence(root, name, resolution) for name in names]


def davis_sequence(root: Path, name: str, resolution: str) -> Sequence:
    frame_dir, annotations = root / "JPEGImages" / resolution / name, root / "Annotations" / resolution / name
    frames = files_under(frame_dir, (".jpg",))  # sorted; a macOS copy's ._00000.jpg is no frame
    if not frames:
        raise DinokitError(
            f"no frames (*.jpg) in {frame_dir}: data= must hold JPEGImages/{resolution}/<sequence>/ for every "
            f"sequence of the split (check data= and resolution={resolution})"
        )
    if len(frames) < 3:
        raise DinokitError(f"{frame_dir} holds {len(frames)} frames: DAVIS scores all but the first and last (3+)")
    if not annotations.is_dir():
        raise DinokitError(
            f"{annotations} is missing: the sequence {name} has no annotations; data= must hold "
            f"Annotations/{resolution}/<sequence>/ (the DAVIS-2017 TrainVal annotations) for every sequence"
        )
    first = annotations / f"{frames[0].stem}.png"
    if not first.is_file():
        raise DinokitError(
            f"{first} is missing: the first frame {frames[0].name} of {name} needs its annotation (the masks to "
            "track); every frame's annotation <frame>.png belongs beside the others"
        )
    size = upright_size(frames[0]) or np.asarray(open_rgb(frames[0])).shape[:2]
    check_frame_sizes(frames, size)
    missing = [a for a in (annotations / f"{f.stem}.png" for f in frames[1:-1]) if not a.is_file()]
    if missing:
        raise DinokitError(
            f"{annotations} lacks {len(missing)} annotations of scored frames (e.g. {missing[0].name}): DAVIS scores "
            "every frame but the first and last against its annotation; complete the download"
        )
    for path in [first, *(annotations / f"{f.stem}.png" for f in frames[1:-1])]:
        found = upright_size(path)
        if found is not None and tuple(found) != tuple(size):
            raise DinokitError(
                f"the annotation {path} is {found[1]}x{found[0]} pixels but the frames of {name} are "
                f"{size[1]}x{size[0]}: frames and annotations of one resolution ({resolution}) belong together"
            )
    return Sequence(name, frames, annotations, tuple(size))


def eval_video(
    model: str,
    data: str,
    out: str = "out/eval-video",
    split: str = "val",
    resolution: str = "480p",
    sequences: list[str] | None = None,
    n_last_frames: int = 7,
    size_mask_neighborhood: int = 12,
    topk: int = 5,
    preprocessing: str = "dino",
    image_size: int = 480,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 2,
) -> str:
    """DAVIS-2017 semi-supervised video object segmentation by DINO's label propagation: J&F over a split.

    data: the DAVIS-2017 folder (JPEGImages, Annotations, ImageSets; download it from davischallenge.org);
    split: a list of ImageSets/2017 (val: DINO's benchmark); sequences: a comma-separated subset of it.
    n_last_frames, size_mask_neighborhood, topk: the propagation (DINO's 7, 12, 5; see `dinokit track`).
    preprocessing: dino (DINO's frames, image_size the short side, 480: the published protocol) or dinokit
    (the maps commands' resize; image_size a multiple of the patch size). precision: fp32 (DINO's) or
    bf16 features. num_workers: processes decoding frames.

    Writes <out>/<sequence>/<frame>.png (DAVIS result masks, davis2017-evaluation reads the folder),
    <out>/<sequence>/scores.json and <out>/video.json: the global J&F-Mean, J-Mean, J-Recall, J-Decay,
    F-Mean, F-Recall, F-Decay (shares in [0, 1], means over all objects of all sequences), per sequence
    and object its scores, and the protocol. Returns the path of video.json.
    """
    from dinokit.eval.common import prepare_backbone, protocol_record
    from dinokit.eval.metrics import davis_global

    check_settings(n_last_frames, size_mask_neighborhood, topk)
    check_preprocessing(preprocessing)
    out_dir = prepare_output(out, folder=True, create=False)
    refuse_other_outputs(out_dir, ("video.json",), "dinokit eval video")
    videos = split_sequences(data, split, resolution, sequences)
    for video in videos:  # none of its masks may replace a frame or an annotation
        names = [f.stem for f in video.frames]
        inputs = [*video.frames, *(video.annotations / f"{name}.png" for name in names)]
        refuse_overwriting_inputs(out_dir, [out_dir / video.name / f"{name}.png" for name in names], inputs)
    with folder_lock(out_dir, "eval video results", wait=False):
        backbone = prepare_backbone(model, device)
        net = backbone.model
        transform = frame_transform(preprocessing, image_size, net.patch_size)
        settings = {"n_last_frames": n_last_frames, "size_mask_neighborhood": size_mask_neighborhood, "topk": topk}
        run = {"weights_hash": backbone.hash, "preprocessing": preprocessing, "image_size": image_size}
        run |= {"precision": precision, "resolution": resolution, **settings}
        finished = finished_sequences(out_dir, videos, run)
        protocol = protocol_record(
            backbone,
            transform,
            image_size,
            precision,
            task="DAVIS-2017 semi-supervised video object segmentation, DINO's label propagation",
            preprocessing=preprocessing,
            features="last block's normed patch tokens, L2-normalised; affinity exp(cos / 0.1)",
            metric="davis2017-evaluation: J (IoU) and F (boundary, 0.008 x diagonal) per object over all frames "
            "but the first and last (void = background); mean, recall (> 0.5), decay (4 bins) per object; "
            "global = mean over all objects of all sequences",
            data=str(data),
            split=split,
            resolution=resolution,
            **settings,
        )
        result = {"complete": False, "sequences": {}, "protocol": protocol}
        write_json(out_dir / "video.json", result)
        for i, video in enumerate(videos):
            if video.name in finished:
                print(f"[{i + 1}/{len(videos)}] {video.name}: finished before, kept ({out_dir / video.name / SCORES})")
                continue
            finished[video.name] = track_sequence(net, video, transform, out_dir, run, precision, num_workers)
            print(f"[{i + 1}/{len(videos)}] {video.name}: J&F-Mean {finished[video.name]['J&F_mean']:.3f}")
        scored = {video.name: finished[video.name] for video in videos}
        result |= {"complete": True, "global": davis_global(list(scored.values()))}
        own = ("run", FILES)  # the resume's records, not results
        result["sequences"] = {name: {k: v for k, v in r.items() if k not in own} for name, r in scored.items()}
        write_json(out_dir / "video.json", result)
        print_table(result, split, backbone.description)
        return str(out_dir / "video.json")


def finished_sequences(out_dir: Path, videos: list[Sequence], run: dict) -> dict[str, dict]:
    """The scores of sequences a run into `out_dir` finished before, by name; a DinokitError where one was
    made with another model or settings (its masks would be mixed with this run's)."""
    finished = {}
    for video in videos:
        path = out_dir / video.name / SCORES
        if not path.is_file():
            continue
        scores = read_json(path, fix="delete it; the sequence is then tracked again")
        if scores.get("run") != run:
            changed = sorted(k for k in run if scores.get("run", {}).get(k) != run[k])
            raise DinokitError(
                f"out={out_dir} holds results of another run ({path}: {', '.join(changed)} differ): choose "
                "another out folder, or delete it to evaluate afresh"
            )
        recorded = scores.get(FILES)  # absent from the scores of earlier versions: kept
        if recorded is not None and recorded != sequence_files_hash(video):
            print(f"{video.name}: its frames or annotations changed since it was scored; tracking it again")
            continue
        finished[video.name] = scores
    return finished


def sequence_files_hash(video: Sequence) -> str:
    """A hash of the sequence's frame names and of its frames' and annotations' sizes and modification
    times (`file_stamps`): it changes where annotations are corrected or frames extracted again, not where
    the same files are reached through another path (a moved or symlinked data=)."""
    files = [*video.frames, *(video.annotations / f"{f.stem}.png" for f in video.frames)]
    record = [[f.name for f in video.frames], file_stamps(files)]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def track_sequence(net, video: Sequence, transform, out_dir: Path, run: dict, precision: str, workers: int) -> dict:
    """Track one DAVIS sequence from its first annotation; writes its masks, then its scores.json."""
    from dinokit.eval.metrics import video_jf

    files = sequence_files_hash(video)  # before they are read: a change meanwhile shows at the next run
    first = video.annotations / f"{video.frames[0].stem}.png"
    mask, colours = read_first_mask(str(first), video.size, video.frames[0])
    labelled = np.where(mask == VOID, 0, mask)
    objects = list(range(1, int(labelled.max()) + 1))  # DAVIS: objects 1..N of the first annotation
    if not objects:
        raise DinokitError(f"the first annotation {first} marks no object (only background and void)")
    names = [f.stem for f in video.frames]
    truths = [None if i in (0, len(names) - 1) else video.annotations / f"{n}.png" for i, n in enumerate(names)]
    loader = DataLoader(FrameFiles(video.frames, transform), batch_size=None, num_workers=workers)
    settings = (run["n_last_frames"], run["size_mask_neighborhood"], run["topk"])
    folder = out_dir / video.name
    per_frame = track_frames(
        net, loader, names, mask, colours, folder, settings, truths, objects, False, precision, video.name
    )
    scores = video_jf(per_frame, objects) | {"frames": len(names), "run": run, FILES: files}
    write_json(folder / SCORES, scores)
    return scores


def print_table(result: dict, split: str, model: str) -> None:
    """davis2017-evaluation's printout: the global measures, then J-Mean and F-Mean per object."""
    from dinokit.eval.metrics import GLOBAL_MEASURES

    print(f"DAVIS-2017 {split}, {model}; transform: {result['protocol']['transform']}")
    print("".join(f"{m:>10}" for m in GLOBAL_MEASURES))
    print("".join(f"{result['global'][m]:>10.3f}" for m in GLOBAL_MEASURES))
    print(f"{'Sequence':<28}{'J-Mean':>8}{'F-Mean':>8}")
    for name, scores in result["sequences"].items():
        for k, o in scores["objects"].items():
            print(f"{name + '_' + k:<28}{o['J']:>8.3f}{o['F']:>8.3f}")
