"""Embeddings and labels as researchers keep them (``dataset=files``).

Formats, by the path:

- ``.npy`` (memory-mapped) and ``.safetensors``: the array, or the tensor named by
  ``dataset.embedding_key`` (default: the only tensor, else ``embeddings`` / ``embedding``);
- ``.pt`` / ``.pth`` (``torch.save``, read with ``weights_only=True``, memory-mapped): a tensor,
  or a dict holding one tensor, or the one named as above;
- ``.parquet``, ``.arrow`` / ``.feather`` / ``.ipc`` (Arrow IPC, file or stream form,
  memory-mapped) and a Hugging Face ``datasets`` folder (``save_to_disk``; a ``DatasetDict``'s
  split is its subfolder, e.g. ``.../train``): a column of equal-length lists (or fixed-size
  lists) of numbers, named by ``dataset.embedding_key`` (default ``embedding`` / ``embeddings``);
  labels from the column ``dataset.label_key`` (default ``label`` / ``labels``) when present.

HDF5 is refused with the one-line conversion (h5py is not a dependency). ``check_readable``
opens a file's header or schema only, so a sweep's planning refuses an unreadable file before
any job is submitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sae.data.errors import DataError

EMBEDDING_KEYS = ("embedding", "embeddings")
LABEL_KEYS = ("label", "labels")
TORCH_SUFFIXES = (".pt", ".pth")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
TABLE_SUFFIXES = (".parquet", *ARROW_SUFFIXES)
HDF5_SUFFIXES = (".h5", ".hdf5")
FORMATS = (".npy, .safetensors, .pt/.pth, .parquet, .arrow/.feather, or a Hugging Face datasets "
           "folder (save_to_disk)")


def is_table(path: Path) -> bool:
    """Parquet, Arrow or a Hugging Face datasets folder: columns, labels possibly among them."""
    return path.suffix in TABLE_SUFFIXES or is_hf_folder(path)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def read_matrix(path: Path, what: str, key: str | None = None) -> Any:
    """The (N, d) embeddings of ``path`` (numpy array or torch tensor), in any format above."""
    check_exists(path, what)
    try:
        if path.suffix == ".npy":
            _check_npy_header(path, what)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return _pick(load_file(str(path)), path, what, key)
        if path.suffix in TORCH_SUFFIXES:
            return _read_torch(path, what, key)
        if is_table(path):
            table = _read_table(path, what)
            return _column_matrix(table, _column(table.column_names, key, EMBEDDING_KEYS,
                                                 path, what, "embedding_key"), path, what)
    except DataError:
        raise
    except Exception as exc:  # corrupt or truncated file: say which one
        raise DataError(f"{what}: cannot read {path} ({' '.join(str(exc).split())[:300]}). "
                        "Fix: re-export the file") from exc
    raise _unknown_format(path, what)


def read_table_labels(path: Path, what: str, key: str | None = None) -> np.ndarray | None:
    """The label column of a table (``key``, else the first of ``label`` / ``labels``);
    None when it has none and no ``key`` was given."""
    table = _read_table(path, what)
    if key is None and not any(name in table.column_names for name in LABEL_KEYS):
        return None
    name = _column(table.column_names, key, LABEL_KEYS, path, what, "label_key")
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise DataError(f"{what}: column {name!r} of {path} has {column.null_count} empty rows. "
                        "Fix: give every row a label (negative = unlabelled)")
    import pyarrow as pa

    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return _column_matrix(table, name, path, what)  # multi-hot rows
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.asarray(column.to_pylist(), dtype=str)  # class names
    return column.to_numpy(zero_copy_only=False)


def check_exists(path: Path, what: str) -> None:
    if path.suffix in HDF5_SUFFIXES:
        raise DataError(f"{what}: {path} is HDF5, which sae-grid does not read (h5py is not a "
                        "dependency). Fix: convert it, e.g. numpy.save('x.npy', "
                        f"h5py.File(path)[name][:]), and point dataset.{what} to the .npy")
    if not path.exists():
        raise DataError(f"{what}: file {path} does not exist. Fix: check dataset.{what}")
    if path.is_dir() and not is_hf_folder(path):
        splits = sorted(p.name for p in path.iterdir() if is_hf_folder(p))
        hint = (f"it holds the splits {', '.join(splits)} of a DatasetDict: point dataset."
                f"{what} to {path}/{splits[0]}" if splits else f"give a file: {FORMATS}")
        raise DataError(f"{what}: {path} is a directory but no Hugging Face datasets folder. "
                        f"Fix: {hint}")


def check_readable(path: Path, what: str, key: str | None = None) -> None:
    """Cheap: the header, the keys or the schema, not the data (planning on a login node)."""
    check_exists(path, what)
    try:
        if path.suffix == ".npy":
            _check_npy_header(path, what)
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                _pick(dict.fromkeys(handle.keys()), path, what, key)
        elif path.suffix in TORCH_SUFFIXES:
            import zipfile

            if not zipfile.is_zipfile(path):
                raise DataError(f"{what}: {path} is not a torch.save archive. Fix: save it with "
                                "torch.save(tensor, path) (PyTorch >= 1.6)")
        elif is_table(path):
            names = _table_columns(path, what)
            _column(names, key, EMBEDDING_KEYS, path, what, "embedding_key")
        else:
            raise _unknown_format(path, what)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{what}: cannot read {path} ({' '.join(str(exc).split())[:300]}). "
                        "Fix: re-export the file") from exc


def _check_npy_header(path: Path, what: str) -> None:
    """Refuse, by what they are, a file that is not a .npy array and one of Python objects
    (which only unpickling, i.e. running code from the file, could read)."""
    from numpy.lib import format as npy

    with path.open("rb") as handle:
        try:
            version = npy.read_magic(handle)
            header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            _shape, _fortran, dtype = header(handle)
        except ValueError as exc:
            raise DataError(f"{what}: {path} is not a .npy array file ({exc}). Fix: save the "
                            "array with numpy.save") from None
    if dtype.hasobject:
        raise DataError(f"{what}: {path} holds Python objects (dtype object), not numbers or "
                        "strings. Fix: save a numeric or string array, e.g. "
                        "numpy.save(path, numpy.asarray(labels, dtype=int))")


def _unknown_format(path: Path, what: str) -> DataError:
    return DataError(f"{what}: {path} is in no format sae-grid reads. Fix: save it as {FORMATS}")


def _pick(tensors: dict[str, Any], path: Path, what: str, key: str | None) -> Any:
    if key is not None:
        if key not in tensors:
            raise DataError(f"{what}: {path} has no tensor {key!r} (it has {sorted(tensors)}). "
                            "Fix: set dataset.embedding_key to one of them")
        return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for name in ("embeddings", "embedding"):
        if name in tensors:
            return tensors[name]
    raise DataError(f"{what}: {path} holds tensors {sorted(tensors)}. Fix: set "
                    "dataset.embedding_key, or store one tensor, or name it 'embeddings'")


def _read_torch(path: Path, what: str, key: str | None) -> Any:
    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an archive written without mmap support: read it whole
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, torch.Tensor):
        return content
    if isinstance(content, dict):
        tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise DataError(f"{what}: {path} is a dict without tensors (keys "
                            f"{sorted(map(str, content))}). Fix: save the embeddings tensor")
        return _pick(tensors, path, what, key)
    raise DataError(f"{what}: {path} holds a {type(content).__name__}, not a tensor or a dict of "
                    "tensors. Fix: torch.save(embeddings_tensor, path)")


def _read_table(path: Path, what: str):
    """The file's rows as a pyarrow Table (memory-mapped where the format allows)."""
    import pyarrow as pa

    if is_hf_folder(path):
        return _hf_dataset(path, what).with_format("arrow")[:]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, memory_map=True)
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path))
    try:
        return ipc.open_file(source).read_all()
    except pa.ArrowInvalid:  # the stream form (Hugging Face's own .arrow files)
        source.seek(0)
        return ipc.open_stream(source).read_all()


def _table_columns(path: Path, what: str) -> list[str]:
    import pyarrow as pa

    if is_hf_folder(path):
        return list(_hf_dataset(path, what).column_names)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path))
    try:
        return list(ipc.open_file(source).schema.names)
    except pa.ArrowInvalid:
        source.seek(0)
        return list(ipc.open_stream(source).schema.names)


def _hf_dataset(path: Path, what: str):
    from datasets import Dataset, load_from_disk

    dataset = load_from_disk(str(path))
    if not isinstance(dataset, Dataset):  # a DatasetDict: one split is one folder below
        splits = ", ".join(dataset)
        raise DataError(f"{what}: {path} is a DatasetDict (splits {splits}). Fix: point "
                        f"dataset.{what} to its split folder, e.g. {path}/{next(iter(dataset))}")
    return dataset


def _column(names: list[str], key: str | None, defaults: tuple[str, ...], path: Path,
            what: str, setting: str) -> str:
    if key is not None:
        if key not in names:
            raise DataError(f"{what}: {path} has no column {key!r} (columns: {', '.join(names)}). "
                            f"Fix: set dataset.{setting} to one of them")
        return key
    for name in defaults:
        if name in names:
            return name
    raise DataError(f"{what}: {path} has none of the columns {', '.join(defaults)} (columns: "
                    f"{', '.join(names)}). Fix: set dataset.{setting}=<column>")


def _column_matrix(table, name: str, path: Path, what: str) -> np.ndarray:
    """(N, d) from a column of equal-length lists of numbers."""
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)):
        raise DataError(f"{what}: column {name!r} of {path} is {kind}, not a list of numbers per "
                        "row. Fix: store each embedding as a list (or fixed-size list) of floats")
    if column.null_count:
        raise DataError(f"{what}: column {name!r} of {path} has {column.null_count} empty rows. "
                        "Fix: drop them")
    rows = len(column)
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
    else:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if rows else 0
        if rows and (lengths != width).any():
            row = int(np.flatnonzero(lengths != width)[0])
            raise DataError(f"{what}: column {name!r} of {path}: row {row} has "
                            f"{int(lengths[row])} values, row 0 has {width}. Fix: give every "
                            "row the same dimension")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(rows, width)
