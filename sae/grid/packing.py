"""Planning packs: which cells of a sweep can train together in one job (no torch).

Cells pack together when they share what the lockstep step needs to be one step: the backbone
and dataset (the same embeddings, loaded once), the ``sae`` preset (one (n, d) shape) and the
``train`` preset (batch, Adam, schedule, checkpoint policy). They may differ in k, regularizer,
strength, mask and seed. Only cells that will launch are packed: a run already ``done`` (or a
duplicate run id) joins no pack, so a pack whose members are all done is never formed.

``pack`` is an int (at most that many members a pack) or ``"auto"``: as many as the device
memory bound allows (:func:`member_bytes`).

A cell the packed objective cannot train (tied weights, LayerNorm) trains unpacked, a pack of
one (:func:`unpacked_reason`). Every registered regularizer packs: the ones whose registry entry
names a fused term (``Regularizer.pack_term``) in the fused head, the others by autograd.

In the sweep (``hydra_plugins/sae_sweeper``): :func:`assign_packs` after ``sae.grid.sweep.plan_cells``;
:func:`packs_table` on a dry run; one job per pack, whose ``pack_members`` override
(:func:`members_override`) carries each member's overrides; the job (``sae.train``) composes them
(:func:`member_overrides`) and calls ``sae.training.job.run_cells``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Literal

from sae.config import RootConfig, to_dict

SHARED_GROUPS = ("backbone", "dataset", "sae", "train")
# Embedding dimension for the memory estimate when the config does not fix it (image datasets,
# user files): the largest reference backbone's (SigLIP2 SO400M, METHOD.md s1), an upper bound.
DIGITS_DIM = 64
DIM_BOUND = 1152
# Bytes per float32 and the (n, d)-sized tensors one member holds: W_enc, W_dec, their
# gradients and two Adam moments each (4 per matrix).
FLOAT_BYTES = 4
MATRIX_COPIES = 2 * 4
# (B, n)-sized float32 blocks alive at the peak of a packed step: pre, the masked activations
# saved for the backward, the gradient of pre and one temporary.
ACTIVATION_BLOCKS = 4


def pack_key(cfg: RootConfig) -> str:
    """Cells with equal keys can share a pack."""
    config = to_dict(cfg)
    return json.dumps({g: config[g] for g in SHARED_GROUPS}, sort_keys=True, default=str)


def member_bytes(cfg: RootConfig, dim: int) -> int:
    """Estimated device memory of one member: weights, gradients and Adam moments of the two
    (n, d) matrices, plus the (B, n) activation blocks of a step. ImageNet size (n 8192,
    d 1024, B 2048): 8 x 32 MiB + 4 x 64 MiB = 512 MiB a member."""
    n, batch = cfg.sae.n_latents, cfg.train.batch_size
    return FLOAT_BYTES * (MATRIX_COPIES * n * dim + ACTIVATION_BLOCKS * batch * n)


def pack_capacity(pack: int | Literal["auto"], per_member: int, memory_bytes: float,
                  shared_bytes: int = 0) -> int:
    """Members a pack may hold: ``pack`` as given, or for ``auto`` as many as fit in
    ``memory_bytes`` beside the shared embeddings. Raises when not even one fits."""
    fits = int((memory_bytes - shared_bytes) // per_member) if per_member else 1
    if pack == "auto":
        if fits < 1:
            raise ValueError(f"one member needs ~{per_member / 2**30:.1f} GiB beside "
                             f"{shared_bytes / 2**30:.1f} GiB of embeddings, more than the "
                             f"{memory_bytes / 2**30:.1f} GiB bound. Fix: raise "
                             "launcher.gpu_mem_gb, or lower train.batch_size")
        return fits
    if pack < 1:
        raise ValueError(f"pack={pack}: use an int >= 1 or auto")
    return pack


def unpacked_reason(cfg: RootConfig) -> str | None:
    """Why this cell cannot join a pack (it then trains alone), or None."""
    if cfg.sae.tied or cfg.sae.layernorm:
        return "tied weights or LayerNorm (a pack trains untied SAEs without LayerNorm)"
    return None  # any registered regularizer packs (sae.training.packed: fused or by autograd)


def pack_conflict(cfgs: Sequence[RootConfig]) -> str | None:
    """Why these cells cannot train as one pack, or None: the one place that decides it, for
    the planner (which groups cells by :func:`pack_key`, these same groups) and for the job and
    the packed trainer (which refuse a pack built otherwise). A member that cannot pack at all
    (:func:`unpacked_reason`), or the first field of a shared group in which a member differs
    from member 0."""
    for index, cfg in enumerate(cfgs):
        if (reason := unpacked_reason(cfg)) is not None:
            return f"pack member {index}: {reason}"
    first = to_dict(cfgs[0])
    for index, cfg in enumerate(cfgs[1:], start=1):
        mine = to_dict(cfg)
        for group in SHARED_GROUPS:
            for name in sorted(set(mine[group]) | set(first[group])):
                if mine[group].get(name) != first[group].get(name):
                    return (f"pack member {index} has {group}.{name}={mine[group].get(name)!r}, "
                            f"member 0 {first[group].get(name)!r}: a pack shares its "
                            f"{', '.join(SHARED_GROUPS)} presets")
    return None


def embedding_dim(cfg: RootConfig) -> int:
    """d for the memory estimate: the dataset's own where the config fixes it, else a bound."""
    if cfg.dataset.kind == "synthetic":
        return int(cfg.dataset.dim)
    if cfg.dataset.kind == "digits":
        return DIGITS_DIM
    return DIM_BOUND


def plan_packs(cells: Sequence, cfg_of: Callable[[object], RootConfig],
               capacity_of: Callable[[RootConfig], int]) -> list[list]:
    """Group the cells to launch (``cell.to_launch``) by :func:`pack_key`, in grid order,
    into packs of at most ``capacity_of(cfg)`` members; a cell that cannot be packed
    (:func:`unpacked_reason`) is a pack of its own."""
    groups: dict[str, list] = {}
    for cell in cells:
        if cell.to_launch:
            cfg = cfg_of(cell)
            key = pack_key(cfg) if unpacked_reason(cfg) is None else f"alone {cell.index}"
            groups.setdefault(key, []).append(cell)
    packs = []
    for members in groups.values():
        size = max(1, capacity_of(cfg_of(members[0])))
        packs.extend(members[i:i + size] for i in range(0, len(members), size))
    return packs


def packs_table(packs: Sequence[Sequence]) -> str:
    """The dry-run listing of the packs: one line per pack, then its members."""
    lines = []
    for number, members in enumerate(packs):
        lines.append(f"pack {number}: {len(members)} member(s)")
        lines.extend(f"    {c.index:4d}  {c.run_id}" for c in members)
    return "\n".join(lines)


def assign_packs(cells: Sequence, pack: int | Literal["auto"], gpu_mem_gb: float) -> list[list]:
    """The packs of a planned sweep (cells carry their ``config``); each member's ``pack`` is set
    to its pack's number when the pack has several members. Raises ``ValueError`` (for
    ``auto``) when one member alone exceeds ``gpu_mem_gb``."""

    def capacity_of(cfg: RootConfig) -> int:
        return pack_capacity(pack, member_bytes(cfg, embedding_dim(cfg)), gpu_mem_gb * 2**30)

    packs = sorted(plan_packs(cells, lambda cell: cell.config, capacity_of),
                   key=lambda members: members[0].index)  # jobs in grid order
    for number, members in enumerate(packs):
        for cell in members:
            cell.pack = number if len(members) > 1 else None
    return packs


def members_override(members: Sequence, extra: Sequence[str] = ()) -> str:
    """The ``pack_members=[...]`` override of a packed job: each member's overrides (and
    ``extra``, the same for all) as one JSON string, single-quoted for Hydra's grammar."""
    quoted = []
    for cell in members:
        text = json.dumps([*cell.overrides, *extra])
        quoted.append("'" + text.replace("'", "\\'") + "'")
    return f"pack_members=[{','.join(quoted)}]"


def member_overrides(entry: str) -> list[str]:
    """One member's overrides, from an entry of ``pack_members``."""
    return [str(o) for o in json.loads(entry)]
