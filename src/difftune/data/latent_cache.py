"""Latents encoded once and reused (data.cache_latents = "memory" | "disk"), as kohya's cache_latents.

What is stored. For every training image and every flip it can train with (its flip_p, data's or its
subset's: 0 → as it is, 1 → mirrored, in between → both), the VAE's latent distribution of the image's
center crop in its bucket: mean and std in raw VAE space and the VAE's dtype (family scale and shift
are applied when a step samples, models/*: `latents_from_distribution`), the original size and crop
corner SDXL's conditioning reads, and the image's mask at latent resolution when masks are on. A step
samples mean + std·ε with ε drawn from the step generator exactly as the VAE's own `sample` draws it
(models/vae_latents.sample_distribution), so training from the cache is training from the images: equal
up to the VAE kernels' float differences between batch compositions (none on the CPU for batches of 2
or more, tests/test_latent_cache.py). A random crop (center_crop = false) is a config error rather
than one cached variant per crop (config/schema.py): every epoch would need another crop.

Disk entries. One safetensors file per (image, flip) under data.latent_cache_dir (default
<output.dir>/latent_cache), named by the sha256 of its key: the image file's content hash (and its
mask file's), the bucket and resized size (with the center crop they fix the crop box), the flip,
alpha_mask, the VAE's identity (class, config, a fingerprint of its weights) and dtype, and
CACHE_FORMAT (raised whenever the transforms change what a crop holds). The cache is not written
beside the images (kohya's .npz sidecars): users' dataset folders stay as they are, and since entries
are keyed by content, several runs may share one folder. Content hashes are memoised in hashes.json by
(path, size, mtime_ns): an untouched file is not read again; a touched one is hashed again and
encoded again only if its bytes changed. Every write is atomic (checkpoint/atomic.py), so an
interrupted build leaves whole entries only (and .tmp- files, removed by a later build once an hour old).
Entries no run uses any more stay until the folder is deleted.

Reading. `CachedBatches` walks TrainBatches' epochs (the same keys, order and batch sizes) and builds
each sample from its entry with the augmentation draws of TrainDataset.__getitem__, without opening
the image; memory entries are read from RAM, disk entries from their file (in the main process:
data.num_workers is not used, an entry is cheaper to read than to send between processes).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from difftune.data.batch import Batch, Sample, collate
from difftune.data.cache_paths import latent_cache_folder
from difftune.data.dataset import SampleKey, TrainBatches, TrainDataset, option
from difftune.data.records import ImageRecord
from difftune.data.transforms import load_placed
from difftune.errors import DatasetError

CACHE_FORMAT = 1
"""Part of every disk key: raise it when a change to data/transforms.py or data/buckets.py changes the
pixels of a (file, bucket, crop, flip), so no entry of the old code is read."""
HASHES = "hashes.json"
STALE_TEMP_SECONDS = 3600
"""A .tmp- file this old is an interrupted write, not one a concurrent run is finishing."""


def flips(record: ImageRecord, data) -> list[bool]:
    """The flips a record trains with, as TrainDataset draws them (`flip_p > 0 and random() < flip_p`)."""
    flip_p = option(record, "flip_p", data)
    return [False] if flip_p <= 0 else [True] if flip_p >= 1 else [False, True]


def describe(data, records: list[ImageRecord], output_dir: str | Path) -> str:
    """Doctor's line for the latent cache, before any model loads: how many (image, flip) entries training
    needs and, for a disk cache, how many entries its folder holds (which of them match is only known
    once the VAE is loaded and the images hashed, when training starts). Like doctor's other memory
    lines it says what a GPU run does."""
    if data.cache_latents == "off":
        return "encoded by the VAE every step (data.cache_latents = 'off')"
    needed = sum(len(flips(record, data)) for record in records)
    folder = latent_cache_folder(data, output_dir)
    if folder is None:
        where = f"in memory when training starts: {needed} images/flips"
    else:
        there = sum(1 for _ in folder.glob("*/*.safetensors")) if folder.is_dir() else 0
        where = f"on disk in {folder}: {needed} images/flips needed, {there} entries there now"
    vae = ("on a GPU the VAE then waits on the CPU (data.offload_encoders)" if data.offload_encoders
           else "the VAE stays on the device")
    return f"cached {where}; {vae}"


@dataclass
class Entry:
    """One (image, flip): its distribution and what its Sample carries besides it."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    bucket: tuple[int, int]
    channels_last: bool = False
    """The VAE gave its latents channels-last (oneDNN on the CPU does): batches are laid out so too, as the
    step's VAE output would be, so the denoiser runs the same kernels (the layout changes float results)."""
    tensors: dict[str, torch.Tensor] | None = None
    """"mean", "std" (C, h, w) and "mask" (1, h, w) when it has one; None: read from `path` when used."""
    path: Path | None = None

    def read(self) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            return self.tensors
        from safetensors.torch import load_file

        try:
            return load_file(self.path)
        except Exception as e:  # an entry damaged outside difftune (writes are atomic)
            raise DatasetError(f"{self.path}: unreadable latent cache entry ({e}); delete it and start again "
                               "(it is encoded again)") from None

    def metadata(self, image: Path, flip: bool) -> dict[str, str]:
        return {"format": str(CACHE_FORMAT), "image": str(image), "flip": str(int(flip)),
                "original_size": _pair(self.original_size), "crop_top_left": _pair(self.crop_top_left),
                "bucket": _pair(self.bucket), "channels_last": str(int(self.channels_last))}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path: Path) -> Entry:
        return cls(_unpair(metadata["original_size"]), _unpair(metadata["crop_top_left"]), _unpair(metadata["bucket"]),
                   channels_last=metadata.get("channels_last") == "1", path=path)


@dataclass
class BuildStats:
    entries: int = 0
    encoded: int = 0
    """Entries encoded by this build (the rest were found on disk)."""
    hashed: int = 0
    """Files whose content was hashed (the rest were known by path, size and mtime)."""
    seconds: float = 0.0

    @property
    def reused(self) -> int:
        return self.entries - self.encoded


class LatentCache:
    """Latent distributions of a dataset's (image, flip) variants, in memory or in `folder` on disk."""

    def __init__(self, folder: Path | None = None):
        """`folder`: the disk cache (data.cache_latents = "disk"); None keeps the entries in memory."""
        self.folder = None if folder is None else Path(folder)
        self._entries: dict[tuple[int, bool], Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (disk entries are read when used)."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() if e.tensors for t in e.tensors.values())

    def entry(self, record: int, flip: bool) -> Entry:
        return self._entries[(record, flip)]

    def build(self, model, dataset: TrainDataset, vae_batch_size: int = 1, show_progress: bool = False) -> BuildStats:
        """Every variant of `dataset` from disk where its entry exists, else encoded, `vae_batch_size`
        images of one bucket per VAE call; the VAE must be where it encodes (the trainer's device)."""
        started, stats = time.perf_counter(), BuildStats()
        hashes = ContentHashes(self.folder / HASHES) if self.folder is not None else None
        vae_id = vae_identity(model.parts["vae"]) if hashes is not None else None
        if self.folder is not None:
            _remove_stale_temporaries(self.folder)
        todo: dict[tuple[int, int], list[tuple[int, bool, Path | None]]] = {}
        for index, record in enumerate(dataset.records):
            placement = dataset.placements[index]
            for flip in flips(record, dataset.data):
                path = None
                if hashes is not None:
                    key = entry_key(hashes, record, placement, flip, dataset.data.alpha_mask, vae_id)
                    path = self.folder / key[:2] / f"{key}.safetensors"
                    found = _read_entry(path)
                    if found is not None:
                        self._entries[(index, flip)] = found
                        continue
                todo.setdefault(placement.bucket, []).append((index, flip, path))
        stats.hashed = hashes.hashed if hashes is not None else 0
        if hashes is not None:
            hashes.save()  # before encoding: an interrupted build keeps the hashes it paid for
        stats.encoded = self._encode(model, dataset, todo, vae_batch_size, show_progress)
        stats.entries, stats.seconds = len(self._entries), time.perf_counter() - started
        return stats

    def _encode(self, model, dataset: TrainDataset, todo, vae_batch_size: int, show_progress: bool) -> int:
        from tqdm.auto import tqdm

        from difftune.training.step import latent_mask

        total = sum(map(len, todo.values()))
        if not total:
            return 0
        data = dataset.data
        bar = tqdm(total=total, desc="latents", unit="image", disable=not show_progress)
        try:
            for bucket in sorted(todo):
                items = todo[bucket]
                for start in range(0, len(items), vae_batch_size):
                    chunk = items[start : start + vae_batch_size]
                    loaded = []
                    for index, flip, _ in chunk:
                        record = dataset.records[index]
                        item = load_placed(record.path, dataset.spec.place, None, flip, alpha_mask=data.alpha_mask,
                                           mask_path=record.mask_path)
                        if item.bucket != bucket:
                            raise DatasetError(f"{record.path}: the image changed since the dataset was scanned; "
                                               "start the run again")
                        loaded.append(item)
                    mean, std = model.encode_latent_distribution(torch.stack([item.pixels for item in loaded]))
                    channels_last = mean.dim() == 4 and mean.stride(1) < mean.stride(-1)
                    for i, ((index, flip, path), item) in enumerate(zip(chunk, loaded, strict=True)):
                        tensors = {"mean": _own(mean[i]), "std": _own(std[i])}
                        if item.mask is not None:
                            tensors["mask"] = _own(latent_mask(item.mask[None], mean[i : i + 1])[0])
                        entry = Entry(item.original_size, item.crop_top_left, item.bucket, channels_last, tensors)
                        if path is not None:
                            _write_entry(path, entry, dataset.records[index].path, flip)
                            entry = replace(entry, tensors=None, path=path)
                        self._entries[(index, flip)] = entry
                    bar.update(len(chunk))
        finally:
            bar.close()
        return total


class CachedBatches:
    """TrainBatches' micro-batches with each sample's latent distribution from the cache (no image read)."""

    def __init__(self, batches: TrainBatches, cache: LatentCache):
        if not batches.dataset.data.center_crop:
            raise ValueError("cached latents need a center crop (config/schema.py refuses the others)")
        self.batches = batches
        self.cache = cache
        self.dataset = batches.dataset

    @property
    def samples_per_epoch(self) -> int:
        return self.batches.samples_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    def epoch_keys(self, epoch: int) -> list[list[SampleKey]]:
        return self.batches.epoch_keys(epoch)

    def epoch(self, epoch: int, start_batch: int = 0):
        """Micro-batches of `epoch` from `start_batch`, as TrainBatches.epoch gives them."""
        for keys in self.batches.epoch_keys(epoch)[start_batch:]:
            samples, entries = zip(*(self.sample(key) for key in keys), strict=True)
            yield collate_cached(list(samples), channels_last=entries[0].channels_last)

    def sample(self, key: SampleKey) -> tuple[Sample, Entry]:
        """TrainDataset.__getitem__'s sample (the same draws), its image replaced by the cached entry."""
        record = self.dataset.records[key.record]
        draws = self.dataset.draws(key)
        entry = self.cache.entry(key.record, draws.flip)
        tensors = entry.read()
        sample = Sample(torch.empty(0), draws.caption, original_size=entry.original_size, crop_top_left=entry.crop_top_left,
                        target_size=entry.bucket, is_reg=record.is_reg, mask=tensors.get("mask"),
                        latent_mean=tensors["mean"], latent_std=tensors["std"])
        return sample, entry


def collate_cached(samples: list[Sample], channels_last: bool = False) -> Batch:
    """Cached samples into a Batch (data/batch.collate), the distributions in the VAE's memory layout."""
    batch = collate(samples)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    batch.latent_mean = batch.latent_mean.contiguous(memory_format=layout)
    batch.latent_std = batch.latent_std.contiguous(memory_format=layout)
    return batch


# ----------------------------------------------------------------------------------------- keys
def entry_key(hashes: ContentHashes, record: ImageRecord, placement, flip: bool, alpha_mask: bool, vae: str) -> str:
    """The sha256 naming a disk entry: everything that changes the stored tensors (module docstring)."""
    fields = {
        "format": CACHE_FORMAT,
        "image": hashes.of(record.path),
        "mask": None if record.mask_path is None else hashes.of(record.mask_path),
        "alpha_mask": bool(alpha_mask),
        "bucket": list(placement.bucket),
        "resized": list(placement.resized),
        "crop": "center",
        "flip": bool(flip),
        "vae": vae,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


FINGERPRINT_VALUES = 16
"""Values read from each VAE tensor (evenly spaced) for its identity: cheap, and any other checkpoint or
a fine-tuned VAE differs in them."""


APPLIED_AFTER = ("scaling_factor", "shift_factor")
"""VAE config keys the families apply to a sample of the stored distribution (not part of an entry)."""


def vae_identity(vae: torch.nn.Module) -> str:
    """A hash of the VAE's class, config (without diffusers' bookkeeping keys such as _name_or_path, so the
    same VAE loaded from elsewhere is the same, nor APPLIED_AFTER), dtype and a fingerprint of its weights:
    evenly spaced values of every tensor, read exactly (no sums), so it does not depend on the device."""
    digest = hashlib.sha256(type(vae).__name__.encode())
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items()
              if not str(k).startswith("_") and k not in APPLIED_AFTER}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(next(vae.parameters()).dtype).encode())
    picks = []
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        if flat.numel():
            where = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_VALUES, flat.numel()), device=flat.device)
            picks.append(flat[where.long()].to(torch.float64))
    if picks:
        digest.update(torch.cat(picks).cpu().numpy().tobytes())  # one transfer
    return digest.hexdigest()


class ContentHashes:
    """sha256 of files' bytes, memoised in a JSON file by (resolved path, size, mtime_ns)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hashed = 0
        self._changed = False
        try:
            self._known: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._known = {}  # none yet, or damaged: hashing again is always safe

    def of(self, file: Path) -> str:
        file = Path(file).resolve()
        stat = file.stat()
        known = self._known.get(str(file))
        if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return known["sha256"]
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self._known[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        self.hashed += 1
        self._changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self._changed:
            from difftune.checkpoint.atomic import atomic_write_json

            atomic_write_json(self.path, self._known)
            self._changed = False


# ------------------------------------------------------------------------------------- the files
def _write_entry(path: Path, entry: Entry, image: Path, flip: bool) -> None:
    from safetensors.torch import save_file

    from difftune.checkpoint.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file(entry.tensors, str(tmp), metadata=entry.metadata(image, flip))


def _read_entry(path: Path) -> Entry | None:
    """The entry at `path` (its metadata; the tensors are read when used), or None if there is none."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != str(CACHE_FORMAT):
            return None
        return Entry.from_metadata(metadata, path)
    except Exception:  # damaged outside difftune: encode it again (the write replaces it)
        return None


def _remove_stale_temporaries(folder: Path) -> None:
    from difftune.checkpoint.atomic import TEMP_PREFIX

    if not folder.is_dir():
        return
    now = time.time()
    for tmp in folder.glob(f"**/{TEMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass  # another run removed it, or it is a folder nobody here wrote


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage (a row of a batch would keep the whole batch alive)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _pair(value) -> str:
    return f"{int(value[0])},{int(value[1])}"


def _unpair(text: str) -> tuple[int, int]:
    first, second = text.split(",")
    return int(first), int(second)
