"""Object and reference boxes of the What'sUp photographs from an open-vocabulary detector (paper Fig 33: the
probes train on the tokens inside each object's box), cached in the box file data_gen.whatsup reads.

    python -m data_gen.whatsup boxes data.whatsup_dir=DIR [data.whatsup_boxes=FILE] [detector.threshold=0.1]

Config: configs/whatsup_data.yaml, `detector:`. The detector is OWLv2 through transformers
(Owlv2ForObjectDetection + Owlv2Processor, from_pretrained(detector.path): a hub id or a local directory).
Per left_of / right_of photo, two text queries, `detector.query` with the object's name and with the
reference's (names with spaces). Post-processing (Owlv2Processor.post_process_grounded_object_detection) gives
every predicted box to the query it scores highest on, so one box never serves both names; a name's box is
its best-scoring box above `detector.threshold`, in the photo's own pixels (OWLv2 pads a photo to a square at
the bottom and right, so boxes are scaled by the longer side), widened to whole pixels and clipped to the
photo. A name with no box above the threshold is recorded as null and reported at the end; a composite that
needs it (a left photo needs both boxes, a right one only its object's) then carries no boxes, and the
experiments that train on boxes drop it and count it (data_gen/whatsup/composites.py, `with_boxes`). Each entry
also holds the boxes' `scores`.

The file (data.whatsup_boxes, default DIR/boxes.json) is rewritten atomically after every batch; photos already
in it are skipped, so an interrupted run resumes; redo=true detects every photo again. A run with another
detector or threshold should write another file (or use redo=true).
"""

import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm
from transformers import Owlv2ForObjectDetection, Owlv2Processor

from common.errors import UsageError, check_choice
from data_gen.whatsup import (
    BOX_KEYS,
    BOXES_FILE,
    Photo,
    load_box_entries,
    read_boxes,
    read_photos,
    whatsup_root,
    write_boxes,
)

DTYPES = ("float32", "float16", "bfloat16")


def box_file(cfg: DictConfig) -> Path:
    """Where the boxes go: data.whatsup_boxes, else <data.whatsup_dir>/boxes.json."""
    value = cfg.data.get("whatsup_boxes")
    if value not in (None, ""):
        return Path(str(value)).expanduser()
    return whatsup_root(cfg.data.whatsup_dir, str(cfg.setting.subset)) / BOXES_FILE


def check_detector(dcfg: DictConfig) -> None:
    """UsageError for a detector config that cannot run, before anything is loaded."""
    if dcfg.path in (None, ""):
        raise UsageError("detector.path is not set: give a hub id (google/owlv2-base-patch16-ensemble) or a "
                         "local OWLv2 directory")
    path = str(dcfg.path)
    if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise UsageError(f"detector.path {path!r} does not exist; give a local OWLv2 directory or a hub id like "
                         f"google/owlv2-base-patch16-ensemble")
    if "{name}" not in str(dcfg.query):
        raise UsageError(f"detector.query={dcfg.query!r} must contain {{name}}, e.g. 'a photo of a {{name}}'")
    threshold = dcfg.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise UsageError(f"detector.threshold={threshold!r} must be a score in [0, 1)")
    size = dcfg.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UsageError(f"detector.batch_size={size!r} must be a positive integer")
    check_choice("detector.dtype", str(dcfg.dtype), DTYPES)


def pixel_box(box, width: int, height: int) -> list[int] | None:
    """A float (x0, y0, x1, y1) box as whole pixels of a width x height photo (exclusive ends): widened to
    whole pixels and clipped to the photo; None when nothing of it is left."""
    x0, y0 = max(0, math.floor(float(box[0]))), max(0, math.floor(float(box[1])))
    x1, y1 = min(width, math.ceil(float(box[2]))), min(height, math.ceil(float(box[3])))
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def detector_device(device: str) -> torch.device:
    """`detector.device` as a torch device (auto: cuda when available, else cpu); UsageError for a bad one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"detector.device={device} is not a device; allowed: auto, cpu, cuda, cuda:N") from err
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"detector.device={device} but {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return resolved


class Detector:
    """OWLv2 loaded from `detector.path` on `detector.device`; `best_boxes` finds named objects in photos."""

    def __init__(self, dcfg: DictConfig):
        self.query, self.threshold = str(dcfg.query), float(dcfg.threshold)
        self.device, self.dtype = detector_device(str(dcfg.device)), getattr(torch, str(dcfg.dtype))
        try:
            local = Path(str(dcfg.path)).expanduser()
            path = str(local) if local.exists() else str(dcfg.path)          # a local directory or a hub id
            self.processor = Owlv2Processor.from_pretrained(path)
            self.model = Owlv2ForObjectDetection.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"cannot load detector {dcfg.path!r} (no local copy and no hub access?): {first}") from err
        self.model.to(self.device).eval().requires_grad_(False)

    def best_boxes(self, images: list[Image.Image], names: list[tuple[str, ...]]
                   ) -> list[list[tuple[list[int], float] | None]]:
        """Per image, per name of `names[i]`: (its best box in the image's pixels, score), or None when no box
        given to that name scores above the threshold."""
        queries = [[self.query.format(name=name) for name in per_image] for per_image in names]
        inputs = self.processor(text=queries, images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad():
            outputs = self.model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        sides = [max(image.size) for image in images]          # padded to a square at the bottom and right
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(side, side) for side in sides])
        found = []
        for image, per_image, result in zip(images, names, results, strict=True):
            best = [None] * len(per_image)
            for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                         result["boxes"].tolist(), strict=True):
                placed = pixel_box(box, *image.size)
                if label < len(per_image) and placed is not None and (best[label] is None or score > best[label][1]):
                    best[label] = (placed, float(score))
            found.append(best)
        return found


def _entry(found) -> dict:
    """A box file entry from best_boxes' (box, score) or None per key of BOX_KEYS."""
    return {**{key: None if f is None else f[0] for key, f in zip(BOX_KEYS, found, strict=True)},
            "scores": {key: None if f is None else round(f[1], 4) for key, f in zip(BOX_KEYS, found, strict=True)}}


def _queried_names(photo: Photo) -> tuple[str, str]:
    return photo.object, photo.reference


def not_found(entries: dict, photos: list[Photo]) -> list[str]:
    """'<photo>: <key> <name>' for every null box of `photos` in `entries`."""
    return [f"{p.path.name}: {key} {name!r}" for p in photos if p.path.name in entries
            for key, name in zip(BOX_KEYS, _queried_names(p), strict=True) if entries[p.path.name].get(key) is None]


def detect_boxes(cfg: DictConfig, detector: Detector | None = None) -> Path:
    """The `boxes` command: detect the boxes of every left_of / right_of photo not yet in the box file, write
    them, report the names not found. Returns the box file."""
    subset = str(cfg.setting.subset)
    photos = read_photos(whatsup_root(cfg.data.whatsup_dir, subset), subset)
    check_detector(cfg.detector)
    out = box_file(cfg)
    entries = {}
    if out.exists() and not cfg.redo:
        read_boxes(out)                                         # a malformed file stops here, untouched
        entries = load_box_entries(out)
    todo = [p for p in photos if p.path.name not in entries]
    print(f"boxes: {len(photos)} left/right photos, {len(photos) - len(todo)} already in {out}, "
          f"{len(todo)} to detect with {cfg.detector.path}")
    if todo:
        detector = detector or Detector(cfg.detector)
        size = int(cfg.detector.batch_size)
        with tqdm(total=len(todo), desc="detecting boxes", unit="photo") as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                images = []
                for photo in batch:
                    with Image.open(photo.path) as image:
                        images.append(image.convert("RGB"))
                for photo, found in zip(batch, detector.best_boxes(images, [_queried_names(p) for p in batch]),
                                        strict=True):
                    entries[photo.path.name] = _entry(found)
                write_boxes(out, entries)
                bar.update(len(batch))
    missing = not_found(entries, photos)
    if missing:
        print(f"boxes: {len(missing)} names not found above detector.threshold={cfg.detector.threshold} "
              f"(null in the box file; experiments that need boxes drop the composites of those photos and count them): "
              f"{'; '.join(missing[:10])}{'; ...' if len(missing) > 10 else ''}")
    print(f"-> {out} (use data.whatsup_boxes={out})")
    return out
