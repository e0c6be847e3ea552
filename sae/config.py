"""Typed schemas of every config group, and their validation.

The Hydra YAML tree under ``conf/`` fills these dataclasses; the root schema ``RootConfig`` is
registered in Hydra's ConfigStore as ``train_schema`` and is the first entry of
``conf/train.yaml``'s defaults list, so a misspelt key or a wrong type fails at compose time.
Cross-field rules (k <= n_latents, strength >= 0, ...) live in ``__post_init__`` and run when a
composed config is turned into objects by :func:`validate` -- for a sweep, for every cell before
any job is submitted.

Every field is documented once, by the comment beside it (one line: ``--help`` shows it,
read from the source by ``sae.cli.help``): here, and for the dataset group in
``sae/dataset_schemas.py`` (re-exported here). This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sae import regularizers
from sae.checks import ConfigError, require
from sae.dataset_schemas import (  # noqa: F401 -- re-exported: the schemas of every group live here
    DATASET_KINDS,
    DATASET_SCHEMAS,
    IMAGE_LAYOUTS,
    DatasetConfig,
    DigitsDatasetConfig,
    FilesDatasetConfig,
    ImagesDatasetConfig,
    SyntheticDatasetConfig,
)

BACKBONE_LIBRARIES = ("none", "open_clip", "timm", "transformers")


@dataclass
class BackboneConfig:
    """A frozen vision backbone that turns images into one embedding each (METHOD.md s1)."""

    name: str = "none"  # config key, e.g. clip_vitl14; "none" = the dataset already is embeddings
    library: str = "none"  # open_clip | timm | transformers | none
    model: str = ""  # library model identifier, e.g. "ViT-L-14" (open_clip), "vit_large_patch16_224.augreg_in21k_ft_in1k" (timm), "google/vit-large-patch16-224" (transformers hub id)
    pretrained: str | None = None  # open_clip pretrained tag / "true" for timm and transformers; null = random weights (tests)
    checkpoint_path: str | None = None  # for compute nodes without network: a weights file, a Hugging Face hub cache directory, or a transformers snapshot directory (sae/backbones/__init__.py)
    embedding: str = "none"  # what is taken: image_projected (open_clip encode_image) | cls_pre_logits (timm) | image_features (transformers get_image_features) | cls_last_hidden_state (transformers CLS of last_hidden_state)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra factory kwargs (small test variants)
    batch_size: int = 128  # images per forward pass during extraction
    num_workers: int | None = None  # DataLoader workers decoding images; null = the CPUs allocated to the job (SLURM_CPUS_PER_TASK, else the process's CPU affinity) minus one
    storage_dtype: str = "float16"  # dtype of the cached array: float16 | float32

    def __post_init__(self) -> None:
        require(self.library in BACKBONE_LIBRARIES, "backbone.library",
                 f"unknown library {self.library!r}", f"use one of {BACKBONE_LIBRARIES}")
        require(self.storage_dtype in ("float16", "float32"), "backbone.storage_dtype",
                 f"{self.storage_dtype!r} is not supported", "use float16 or float32")
        require(self.batch_size > 0, "backbone.batch_size", "must be positive", "set e.g. 128")
        require(self.num_workers is None or self.num_workers >= 0, "backbone.num_workers",
                 "is negative", "use null (the job's CPUs minus one) or a count >= 0")
        if self.library != "none":
            require(bool(self.model), "backbone.model", "is empty",
                    "give the open_clip / timm / transformers model identifier")

    @property
    def checkpoint(self) -> str:
        """The library and public name of the weights, e.g. "transformers google/vit-large-
        patch16-224" or "open_clip ViT-L-14 / datacomp_xl_s13b_b90k" (dry runs, method card)."""
        tag = f" / {self.pretrained}" if self.library == "open_clip" and self.pretrained else ""
        weights = "" if self.pretrained else " (random weights)"
        return f"{self.library} {self.model}{tag}{weights}"


@dataclass
class SAEConfig:
    """The Top-k sparse autoencoder (METHOD.md s2). The budget k is the top-level ``k``."""

    n_latents: int = 8192  # dictionary size n
    tied: bool = False  # encoder weight = decoder weight (one matrix)
    layernorm: bool = False  # per-sample standardisation inside the SAE, undone on the output
    aux_alpha: float = 1.0 / 32  # weight of the AuxK loss (Gao et al. 2024)
    aux_k: int | None = None  # dead latents used by AuxK; null = min(d // 2, n_latents)
    dead_window_samples: int = 10_000_000  # a latent is dead after this many samples without firing
    dead_window_max_epochs: float = 2.0  # ...capped at this many epochs of a small dataset

    def __post_init__(self) -> None:
        require(self.n_latents > 0, "sae.n_latents", "must be positive", "use e.g. 8192")
        require(self.aux_alpha >= 0, "sae.aux_alpha", "is negative", "use 1/32 or 0")
        require(self.aux_k is None or self.aux_k > 0, "sae.aux_k", "must be positive or null",
                 "use null for min(d // 2, n_latents)")
        require(self.dead_window_samples > 0 and self.dead_window_max_epochs > 0,
                 "sae.dead_window_samples", "must be positive", "use e.g. 10000000")


@dataclass
class RegularizerConfig:
    """The sparsity penalty before Top-k (METHOD.md s3); its mask rule is the top-level ``mask``."""

    name: str = "none"  # a sae.regularizers name: none | offsupport_l1 | l1l2 | registered ones
    strength: float = 0.0  # lambda: weight of the penalty in the loss (calibration in README)
    eps: float = 1e-8  # l1l2: added to the L2 norm so an all-zero code has ratio 0

    def __post_init__(self) -> None:
        require(self.name in regularizers.names(), "regularizer.name",
                f"unknown regularizer {self.name!r}",
                f"use one of {regularizers.names()} (regularizer=<name> on the command line)")
        require(math.isfinite(self.strength) and self.strength >= 0, "regularizer.strength",
                 f"{self.strength} is not a finite value >= 0", "use e.g. regularizer.strength=0.01")
        require(self.eps > 0, "regularizer.eps", "must be positive", "use 1e-8")


@dataclass
class TrainConfig:
    """Optimisation (METHOD.md s2 defaults: batch 2048, Adam lr 1e-4, eps 6.25e-10, 50 epochs)."""

    batch_size: int = 2048  # samples per step
    lr: float = 1e-4  # Adam learning rate
    adam_eps: float = 6.25e-10  # Adam epsilon
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    epochs: float = 50.0  # passes over the train split (fractional allowed)
    max_steps: int | None = None  # stop after this many steps regardless of epochs (smoke tests)
    checkpoint_every: int = 0  # steps between checkpoints (and at the end); 0 = by time only
    checkpoint_every_s: float = 300.0  # training seconds between checkpoints, checked at log steps; 0 = off
    log_every: int = 50  # steps between logged losses (the only host synchronisation points)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast_bf16: bool = False  # bf16 autocast with fp32 master weights (GPU)
    compile: bool = False  # torch.compile only the fast path's fused penalty kernels; the step stays eager
    fast_path: bool = True  # fused sparse step (sae/training/fast/); false = the plain reference step
    progress: bool = True  # progress bar (plain lines when stderr is not a terminal)

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "train.batch_size", "must be positive", "use e.g. 2048")
        require(math.isfinite(self.lr) and self.lr > 0, "train.lr", f"{self.lr} is not > 0",
                 "use e.g. 1e-4")
        require(self.epochs > 0, "train.epochs", "must be positive", "use e.g. 50")
        require(self.max_steps is None or self.max_steps > 0, "train.max_steps",
                 "must be positive or null", "use null to train for train.epochs")
        require(self.checkpoint_every >= 0 and self.log_every > 0, "train.checkpoint_every",
                 "must be >= 0 (log_every > 0)", "use e.g. 500 and 50")
        require(math.isfinite(self.checkpoint_every_s) and self.checkpoint_every_s >= 0,
                 "train.checkpoint_every_s", f"{self.checkpoint_every_s} is not >= 0",
                 "use e.g. 300 (0 = by steps only)")


@dataclass
class EvalConfig:
    """The evaluation stage (METHOD.md s4)."""

    chunk_size: int = 8192  # samples per streamed chunk (bounds memory on large splits)
    k_multiples: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])  # inference k / train k
    probe_m: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # top-m kept for probing (k is added)
    probe_max_train: int = 100_000  # probe-train samples (a seeded subsample of the train split)
    probe_epochs: int = 30  # L-BFGS iterations (not epochs; key kept for run ids) of the full-batch logistic probe
    probe_weight_decay: float = 1e-4  # L2 penalty of the probe
    similarity: str = "input"  # MonoScore similarity embeddings: input (the SAE's own) | backbone:NAME (its cache of this eval split) | cache:DIR | file:PATH (.npy / .safetensors)
    purity_top_n: int | None = None  # purity over each latent's top-N activations only; null = all
    inspect_latents: int = 12  # latents per selection rule on the contact sheets
    inspect_top_images: int = 16  # top-activating images per latent

    def __post_init__(self) -> None:
        require(self.chunk_size > 0, "eval.chunk_size", "must be positive", "use e.g. 8192")
        parse_similarity(self.similarity)
        require(all(m > 0 for m in self.k_multiples), "eval.k_multiples",
                 "holds a non-positive multiple", "use positive multiples such as [0.5, 1, 2]")
        require(all(m > 0 for m in self.probe_m), "eval.probe_m", "holds a non-positive m",
                 "use positive budgets such as [1, 2, 4]")


SIMILARITY_KINDS = ("input", "backbone", "cache", "file")


@dataclass(frozen=True)
class Similarity:
    """``eval.similarity`` parsed: its kind, and the backbone name, directory or file."""

    kind: str  # one of SIMILARITY_KINDS
    target: str = ""  # "" for input

    def __str__(self) -> str:
        return self.kind if self.kind == "input" else f"{self.kind}:{self.target}"


def parse_similarity(value: str) -> Similarity:
    """``input`` or ``<kind>:<target>``; anything else fails naming the forms."""
    if value == "input":
        return Similarity("input")
    kind, sep, target = value.partition(":")
    require(bool(sep) and kind in SIMILARITY_KINDS[1:] and bool(target), "eval.similarity",
             f"{value!r} does not name its kind",
             "use input, backbone:NAME, cache:DIR or file:PATH (e.g. backbone:dinov2_vitl14)")
    return Similarity(kind, target)


@dataclass
class LoggerConfig:
    """Experiment tracking. Only ``sae.tracking`` reads it."""

    name: str = "wandb"  # wandb | none
    project: str = "sae-grid"  # W&B project
    entity: str | None = None  # W&B entity (team or user); null = the account default
    mode: str = "auto"  # auto (offline without an API key or a reachable server) | online | offline
    probe_timeout_s: float = 3.0  # auto: seconds to wait for the W&B server before going offline

    def __post_init__(self) -> None:
        require(self.name in ("wandb", "none"), "logger.name", f"unknown logger {self.name!r}",
                 "use logger=wandb or logger=none")
        require(self.mode in ("auto", "online", "offline"), "logger.mode",
                 f"unknown mode {self.mode!r}", "use auto, online or offline")


@dataclass
class ExtractOptions:
    """How stage 1 writes and reuses embedding caches (``python -m sae.extract``, and training
    on a cache miss). Never part of a run's identity."""

    shard_size: int = 8192  # images per resumable shard: a killed or preempted extraction resumes from the last complete one (rounded up to a multiple of backbone.batch_size)
    allow_version_drift: bool = False  # use a cache built by other major.minor versions of torch, open_clip, timm or transformers (refused otherwise)
    inline: bool = True  # training extracts a missing cache itself; a SLURM sweep sets false: its extraction jobs build the caches first, and a training task never extracts nor waits on an extraction lock
    train_cache: str | None = None  # the train split's cache directory, resolved by the sweep planner: opened as it is, without listing the image tree (null: resolved from the dataset root)
    eval_cache: str | None = None  # the same for the evaluation split
    verify: str = "sizes"  # at use: sizes (file sizes and the manifest; checksums are verified when a cache is built) | checksums (re-read every file against its sha256)

    def __post_init__(self) -> None:
        require(self.shard_size > 0, "extract.shard_size", "must be positive", "use e.g. 8192")
        require(self.verify in ("sizes", "checksums"), "extract.verify",
                f"unknown check {self.verify!r}", "use sizes or checksums")


@dataclass
class PathsConfig:
    """Where things are written. Never part of a run's identity."""

    root: str = "${oc.env:SAE_OUTPUT_ROOT,outputs}"  # root of runs, sweeps and caches
    runs: str = "${paths.root}/runs"  # one directory per run id
    sweeps: str = "${paths.root}/sweeps"  # one directory per sweep name
    cache: str = "${paths.root}/cache"  # content-addressed embedding caches


@dataclass
class RunConfig:
    """How one cell's process behaves around other processes (never part of the run id)."""

    # A second process of the same cell (another sweep sharing it) waits for the first one's
    # lock, saying whose it is. 24 h: longer than any paper cell trains.
    lock_timeout_s: float | None = 86_400.0  # seconds to wait for another process's lock on the cell, then fail naming it; null = no limit


@dataclass
class ExtractJobConfig:
    """What a SLURM sweep's extraction job (stage 1) asks for: one per missing embedding cache,
    submitted before the training tasks, which start after it (``afterok``)."""

    cpus_per_task: int = 16  # image decoding: DataLoader workers = these CPUs minus one
    gpus_per_node: int = 1  # the backbone's forward pass (0 on a cluster without GPUs)
    mem_gb: int = 64  # host memory: decoded image batches, the model, the shards
    timeout_min: int = 240  # time limit; at it the job is requeued (USR2) and resumes from its last shard


@dataclass
class LauncherConfig:
    """Facts about the machine a job gets that planning needs (the launcher is ``hydra.launcher``)."""

    gpu_mem_gb: float = 8.0  # device memory one job may use, in GB: the bound of pack=auto
    wait: bool = True  # SLURM: wait for every job and print progress; false: return right after submission (follow with sae-status SWEEP_DIR; a re-launch re-attaches)
    extract: ExtractJobConfig = field(default_factory=ExtractJobConfig)  # resources of the stage-1 extraction jobs (launcher=slurm)
    result_grace_s: float = 15.0  # how long a task that ended without its result file may take to show one (a shared filesystem slow to show another node's file), waited once for all such tasks together


PACK_AUTO = "auto"


@dataclass
class RootConfig:
    """One grid cell: backbone x dataset x k x regularizer x mask x seed, and how to run it."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    k: int = 64  # Top-k budget during training
    mask: bool = True  # restrict the regularizer to batch-active units (no effect without one)
    seed: int = 0  # seed of SAE initialisation and batch order
    sweep_name: str = "adhoc"  # W&B group and sweep directory name (set by sweep files)
    dry_run: bool = False  # multirun: list the cells and their run ids, run nothing
    force: bool = False  # retrain from scratch even when done; old outputs move to <run>/previous-<time>/ (sae-clean)
    pack: Any = 1  # multirun: cells one job trains together (int >= 1), or auto (launcher.gpu_mem_gb)
    pack_members: list[str] = field(default_factory=list)  # internal: a packed job's cells (overrides)

    def __post_init__(self) -> None:
        require(self.pack == PACK_AUTO or (isinstance(self.pack, int) and self.pack >= 1
                                           and not isinstance(self.pack, bool)), "pack",
                f"{self.pack!r} is neither an int >= 1 nor {PACK_AUTO!r}",
                "use pack=1 (one job a cell), pack=8 or pack=auto")
        require(self.k > 0, "k", f"{self.k} is not positive", "use a budget such as k=32")
        require(self.k <= self.sae.n_latents, "k",
                 f"{self.k} exceeds sae.n_latents={self.sae.n_latents}",
                 "lower k or raise sae.n_latents")
        if self.dataset.kind == MISSING:
            return
        if self.dataset.kind == "images":
            require(self.backbone.library != "none", "backbone",
                     f"dataset {self.dataset.name!r} holds images and needs a backbone",
                     "add backbone=clip_vitl14 (or another conf/backbone option)")
        else:
            require(self.backbone.library == "none", "backbone",
                     f"dataset {self.dataset.name!r} already holds embeddings",
                     "use backbone=none with this dataset")
        if self.regularizer.name != "none":
            require(self.regularizer.strength > 0, "regularizer.strength",
                     f"is 0 with regularizer {self.regularizer.name!r}",
                     "set a positive strength or use regularizer=none")


def register_configs() -> None:
    """Register the root schemas, one ``dataset/<kind>_schema`` per dataset kind (which the
    conf/dataset YAML files extend), and then the ``--help`` pages generated from them (last, so
    that they see every registered schema), with Hydra; called on import of the entry points.
    The pages are rendered only when the command line asks for help (every task start imports
    an entry point; :func:`sae.cli.help.register_help`)."""
    from hydra.core.config_store import ConfigStore

    from sae.cli.help import register_help

    store = ConfigStore.instance()
    store.store(name="train_schema", node=RootConfig)
    store.store(name="extract_schema", node=ExtractConfig)
    for kind, dataset_schema in DATASET_SCHEMAS.items():
        store.store(group="dataset", name=f"{kind}_schema", node=dataset_schema)
    register_help("train", RootConfig)
    register_help("extract", ExtractConfig)


def validate(cfg: DictConfig | RootConfig, schema: type = RootConfig) -> Any:
    """Resolve a composed config against ``schema`` (``RootConfig``, or ``ExtractConfig`` for
    the extract app) and run every schema and cross-field check.

    Returns the typed config. Raises :class:`ConfigError` naming the field and the fix.
    """
    if isinstance(cfg, schema):
        return cfg
    node = cfg.copy()
    OmegaConf.set_struct(node, False)
    node.pop("hydra", None)  # Hydra's own node, present in composed configs
    try:
        _type_dataset(node)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc}. Fix: check the field's name and type in sae/config.py") from exc
    except ValueError as exc:  # raised by a __post_init__ check of a nested dataclass
        raise ConfigError(str(exc)) from exc
    assert isinstance(obj, schema)
    return obj


def _type_dataset(node: DictConfig) -> None:
    """Give ``node.dataset`` the schema of its kind (a composed config already has it; a plain
    one, e.g. built in a notebook, gets it here)."""
    kind = OmegaConf.select(node, "dataset.kind", default=None, throw_on_missing=False)
    schema = DATASET_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is not None and OmegaConf.get_type(node.dataset) is not schema:
        node.dataset = OmegaConf.merge(OmegaConf.structured(schema), node.dataset)


def to_dict(cfg: RootConfig) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a typed config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


@dataclass
class ExtractConfig:
    """Root of ``python -m sae.extract`` (conf/extract.yaml): embed image splits into the cache."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    split: str = "both"  # train | eval | both: the split(s) of the dataset to embed
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda | cuda:N
    progress: bool = True  # progress bar (plain lines when stderr is not a terminal)

    def __post_init__(self) -> None:
        require(self.split in ("train", "eval", "both"), "split", f"unknown split {self.split!r}",
                 "use split=train, split=eval or split=both")
        if self.dataset.kind == MISSING:  # the bare schema, before a group fills it
            return
        require(self.dataset.kind == "images", "dataset",
                 f"dataset {self.dataset.name!r} already holds embeddings (kind "
                 f"{self.dataset.kind!r}); there is nothing to extract",
                 "use an image dataset: imagenet, openimages or digits_images")
        require(self.backbone.library != "none", "backbone", "is none",
                 "add backbone=clip_vitl14 (or another conf/backbone option)")
