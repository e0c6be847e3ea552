"""Typed schemas of the ``dataset`` config group: the fields every kind has, and one subclass
per kind (``DATASET_SCHEMAS``), registered in Hydra's ConfigStore as ``dataset/<kind>_schema``
(:func:`sae.config.register_configs`), which each conf/dataset YAML file extends.

A field marked ``identity=False`` (:func:`identity_field`) stays out of the run id; every other
field of the kind's schema is part of it (:meth:`DatasetConfig.identity`), so a new kind or field
names its runs without a second list. Re-exported by :mod:`sae.config`. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from sae.checks import require

IMAGE_LAYOUTS = ("imagenet", "imagenet_hf", "openimages", "digits_images")
SAMPLING_PROTOCOLS = ("per_image", "narratives")


def identity_field(default: Any = MISSING, *, identity: bool = True, **kwargs: Any) -> Any:
    """A dataset field; ``identity=False`` keeps it out of the run id (where the data lies, what
    to do with a broken file: nothing that changes the numbers)."""
    return field(default=default, metadata={"identity": identity}, **kwargs)


@dataclass
class DatasetConfig:
    """Where the embeddings come from: the fields every kind has. One subclass per kind
    (``DATASET_SCHEMAS``), registered in Hydra's ConfigStore as ``dataset/<kind>_schema``, which
    each conf/dataset YAML file extends."""

    name: str = MISSING  # config key: synthetic | digits | files | imagenet | openimages | digits_images
    kind: str = MISSING  # synthetic | digits | files | images (images need a backbone)
    multi_label: bool = False  # labels are (N, C) multi-hot instead of (N,) class ids
    normalize: bool = True  # L2-normalise every embedding to unit norm (MonoLoss convention)

    def identity(self) -> dict[str, Any]:
        """The fields that name a run (those not marked ``identity=False``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("identity", True)}

    def __post_init__(self) -> None:
        if MISSING in (self.name, self.kind):  # the bare schema, before a group fills it
            return
        require(self.kind in DATASET_KINDS, "dataset.kind", f"unknown kind {self.kind!r}",
                 f"use one of {DATASET_KINDS}")
        schema = DATASET_SCHEMAS[self.kind]
        require(isinstance(self, schema), "dataset.kind",
                 f"kind {self.kind!r} given to the {type(self).__name__} schema",
                 f"extend {self.kind}_schema in the dataset's YAML file")


@dataclass
class _HeldOut:
    """A dataset without an official evaluation split holds one out."""

    eval_fraction: float = 0.2  # fraction held out (stratified for digits) as the evaluation split
    split_seed: int = 0  # seed of the train/eval split (and of an images subset)

    def _check_held_out(self) -> None:
        require(0.0 < self.eval_fraction < 1.0, "dataset.eval_fraction",
                 f"{self.eval_fraction} is outside (0, 1)", "use e.g. 0.2")


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    """A planted sparse dictionary with class structure (recovery is measurable)."""

    kind: str = "synthetic"
    dim: int = 64  # embedding dimension d
    n_atoms: int = 256  # planted dictionary size
    atoms_per_sample: int = 4  # planted atoms active in each sample
    n_classes: int = 8  # classes; each class prefers its own block of atoms
    class_affinity: float = 0.8  # probability that an atom is drawn from the sample's class block
    noise: float = 0.01  # std of isotropic Gaussian noise added before normalisation
    n_train: int = 8192  # samples in the train split
    n_eval: int = 2048  # samples in the evaluation split
    data_seed: int = 0  # seed of the planted dictionary and the samples

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dim", "n_atoms", "atoms_per_sample", "n_classes", "n_train", "n_eval"):
            require(getattr(self, name) > 0, f"dataset.{name}", "must be positive",
                     "set a positive integer")
        require(self.atoms_per_sample <= self.n_atoms, "dataset.atoms_per_sample",
                 "exceeds n_atoms", "lower atoms_per_sample or raise n_atoms")
        require(self.noise >= 0, "dataset.noise", "is negative", "use noise >= 0")


@dataclass
class DigitsDatasetConfig(_HeldOut, DatasetConfig):
    """scikit-learn's 8x8 handwritten digits as pixel vectors."""

    kind: str = "digits"
    min_pixel_coverage: float = 0.05  # keep pixels inked in >= this fraction of images

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_held_out()


@dataclass
class FilesDatasetConfig(_HeldOut, DatasetConfig):
    """User-supplied embeddings, in any format of ``sae.data.formats``."""

    kind: str = "files"
    train_path: str | None = None  # (N, d) embeddings of the train split
    eval_path: str | None = None  # (N, d) embeddings of the evaluation split; null = hold out eval_fraction
    # Labels (.npy, one row per embedding): (N,) integer class ids -- integral floats too; a
    # negative id means "unlabelled" (left out of purity and of the single-label probe, counted
    # in the method card) -- or (N,) strings mapped through dataset.class_names, or (N, C)
    # multi-hot rows. Any other float, object arrays and non-.npy files are refused.
    train_labels: str | None = None  # optional labels of the train split (.npy)
    eval_labels: str | None = None  # optional labels of the evaluation split (.npy)
    class_names: str | None = None  # text file, one class name per line: line i names class id i
    embedding_key: str | None = None  # tensor (.safetensors, .pt dict) or column (parquet, arrow, datasets folder) of the embeddings; null = embedding(s)
    label_key: str | None = None  # label column of a table file; null = label(s) when present

    def identity(self) -> dict[str, Any]:
        """As every kind's; the two keys only when set, so runs from before they existed keep
        their ids (the files' digests name the data either way)."""
        return {name: value for name, value in super().identity().items()
                if value is not None or name not in ("embedding_key", "label_key")}

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_held_out()
        require(bool(self.train_path), "dataset.train_path", "is not set",
                 "point it to embeddings of shape (N, d): .npy, .safetensors, .pt, .parquet, "
                 ".arrow or a Hugging Face datasets folder")


@dataclass
class ImagesDatasetConfig(DatasetConfig):
    """Real image datasets, embedded by the backbone into the cache."""

    kind: str = "images"
    root: str | None = identity_field(None, identity=False)  # dataset root directory (from an environment variable in conf/dataset)
    train_split: str = "train"  # split name that trains the SAE
    eval_split: str = "val"  # split name that evaluates it
    max_per_split: int | None = None  # keep at most this many images per split (smoke tests)
    on_unreadable: str = identity_field("fail", identity=False)  # an undecodable image: fail (naming its path) | skip (and count it)
    sampling: str = "per_image"  # samples of a split: per_image (each image once) | narratives (openimages: one per (image, Localized Narratives caption), labelled images only: the reference code's)
    # The three below are left out of the run id as they always were (ids stay stable); the
    # cache key, which the run's data comes from, does hold them.
    layout: str = identity_field("imagenet", identity=False)  # images on disk: imagenet (<split>/<class>/*) | imagenet_hf (a Hugging Face datasets copy: save_to_disk, or parquet / arrow files) | openimages | digits_images (written once under root)
    eval_fraction: float = identity_field(0.2, identity=False)  # digits_images: fraction held out as the val split
    split_seed: int = identity_field(0, identity=False)  # seed of the max_per_split subset (and of digits_images' split)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.eval_fraction < 1.0, "dataset.eval_fraction",
                 f"{self.eval_fraction} is outside (0, 1)", "use e.g. 0.2")
        require(self.on_unreadable in ("fail", "skip"), "dataset.on_unreadable",
                 f"{self.on_unreadable!r} is not an option", "use fail or skip")
        require(self.layout in IMAGE_LAYOUTS, "dataset.layout",
                 f"unknown layout {self.layout!r}", f"use one of {IMAGE_LAYOUTS}")
        require(self.sampling in SAMPLING_PROTOCOLS, "dataset.sampling",
                 f"unknown protocol {self.sampling!r}", f"use one of {SAMPLING_PROTOCOLS}")
        require(self.sampling == "per_image" or self.layout == "openimages", "dataset.sampling",
                 f"{self.sampling} needs Open Images' Localized Narratives",
                 "use sampling=per_image with this layout")


DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "synthetic": SyntheticDatasetConfig, "digits": DigitsDatasetConfig,
    "files": FilesDatasetConfig, "images": ImagesDatasetConfig,
}
DATASET_KINDS = tuple(DATASET_SCHEMAS)
