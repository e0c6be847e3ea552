"""Embeddings as researchers keep them (issue 22, item 2): every format of sae.data.formats
gives the same rows and labels as the .npy it was written from; unreadable files are refused
at planning, in one line with exit 2, leaving no run folder; the content digest names the data
whatever the format."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch

from sae.data import load_splits
from sae.data.errors import DataError
from sae.identity import run_id
from tests.helpers import run_cli
from tests.test_config import files_cfg

ROWS, DIM = 60, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    y = np.arange(ROWS) % 3
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    torch.save(torch.from_numpy(x), root / "bare.pt")
    torch.save({"embeddings": torch.from_numpy(x), "ids": torch.arange(ROWS)}, root / "dict.pt")
    pq.write_table(pa.table({"embedding": list(x), "label": y}), root / "lists.parquet")
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)
    pq.write_table(pa.table({"feats": fixed, "cls": y}), root / "fixed.parquet")
    table = pa.table({"embedding": list(x), "label": y})
    with pa.OSFile(str(root / "file.arrow"), "wb") as sink, ipc.new_file(sink, table.schema) as w:
        w.write(table)
    with pa.OSFile(str(root / "stream.arrow"), "wb") as sink, \
            ipc.new_stream(sink, table.schema) as w:
        w.write(table)
    import datasets

    datasets.Dataset.from_dict({"embedding": x.tolist(), "label": y.tolist()}).save_to_disk(
        str(root / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"embedding": x.tolist()})}
                         ).save_to_disk(str(root / "hfdict"))
    return root, x, y


FORMATS = [("x.npy", {}, False), ("bare.pt", {}, False), ("dict.pt", {}, False),
           ("lists.parquet", {}, True), ("fixed.parquet", {"embedding_key": "feats",
                                                           "label_key": "cls"}, True),
           ("file.arrow", {}, True), ("stream.arrow", {}, True), ("hf", {}, True)]


@pytest.mark.parametrize(("name", "keys", "labelled"), FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_reads_the_same_rows_and_labels(data, name, keys, labelled):
    root, x, y = data
    cfg = files_cfg(root, train_path=root / name, eval_path=root / name, **keys)
    train, evaluation = load_splits(cfg)
    expected = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)  # normalize=true
    torch.testing.assert_close(train.x, expected)
    torch.testing.assert_close(evaluation.x, expected)
    if labelled:  # the label column came along
        assert torch.equal(train.labels, torch.from_numpy(y))
    else:
        assert train.labels is None


def test_the_content_digest_names_the_data_in_every_format(data, tmp_path):
    root, x, _ = data
    ids = {name: run_id(files_cfg(root, train_path=root / name, **keys))
           for name, keys, _ in FORMATS}
    assert len(set(ids.values())) == len(ids)  # other bytes, other runs
    changed = tmp_path / "changed.parquet"
    pq.write_table(pa.table({"embedding": list(x * 2), "label": np.zeros(ROWS, int)}), changed)
    assert run_id(files_cfg(root, train_path=changed)) != ids["lists.parquet"]
    assert run_id(files_cfg(root, train_path=root / "x.npy")) == ids["x.npy"]  # stable


REFUSALS = [
    ("hfdict", {}, "is a DatasetDict (splits train). Fix: point dataset.train_path to"),
    ("data.h5", {}, "is HDF5"),
    ("notes.txt", {}, "in no format sae-grid reads"),
    ("lists.parquet", {"embedding_key": "nope"}, "has no column 'nope'"),
]


@pytest.mark.parametrize(("name", "keys", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_an_unreadable_file_is_refused_at_planning(data, name, keys, message):
    """The planner's check (sae.grid.sweep.check_files), which a single run and a sweep run first."""
    from sae.config import ConfigError
    from sae.grid.sweep import check_files

    root, _, _ = data
    (root / "data.h5").write_bytes(b"\x89HDF\r\n")
    (root / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_files(files_cfg(root, train_path=root / name, **keys).dataset)


def test_a_refusal_exits_2_before_any_job_and_any_folder(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "out"
    for mode in (["-m", "dry_run=true"], []):
        result = run_cli(["-m", "sae.train", *mode, "dataset=files", "sae=tiny", "k=4",
                          f"dataset.train_path={root / 'hfdict'}"],
                         env_extra={"SAE_OUTPUT_ROOT": str(out)}, timeout=120)
        assert result.returncode == 2, (mode, result.stdout[-2000:], result.stderr[-2000:])
        assert "is a DatasetDict" in result.stdout + result.stderr, (mode, result.stderr)
        assert not (out / "runs").exists()


def test_formats_refuse_what_they_cannot_read(data, tmp_path):
    from sae.data.formats import read_matrix

    root, _, _ = data
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0]]}), ragged)
    with pytest.raises(DataError, match="row 1 has 1 values, row 0 has 2"):
        read_matrix(ragged, "train_path")
    several = tmp_path / "several.pt"
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, several)
    with pytest.raises(DataError, match="set dataset.embedding_key"):
        read_matrix(several, "train_path")
