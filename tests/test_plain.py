"""Plain data helpers (sae.io.plain) and the progress bar's log-file lines (sae.runtime.progress)."""

from io import StringIO

import numpy as np
from omegaconf import OmegaConf

from sae.io.plain import flatten, plain
from sae.runtime.progress import Progress


def test_plain_is_json_canonical():
    value = {"b": (1, 2), "a": OmegaConf.create({"y": 1, "x": [0.5]}), "c": object,
             "n": np.float32(2.0)}
    out = plain(value)
    assert list(out) == ["a", "b", "c", "n"] and list(out["a"]) == ["x", "y"]
    assert out["b"] == [1, 2] and out["a"]["x"] == [0.5] and type(out["n"]) is float
    assert out["c"] == str(object)


def test_flatten_joins_keys():
    tree = {"a": {"b": 1, "c": {"d": [1]}}, "e": None, "f": {}}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [1], "e": None}
    assert flatten(tree, sep="/") == {"a/b": 1, "a/c/d": [1], "e": None}


def test_progress_lines_are_readable_in_a_log_file():
    stream = StringIO()
    bar = Progress(10, "extract x/train", "img", every_s=0.0, stream=stream)
    bar.update(4)
    bar.note("a line of its own")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[0].startswith("extract x/train:  40%") and "img/s" in lines[2]
    assert lines[1] == "a line of its own"
    quiet = StringIO()
    off = Progress(10, "x", "img", enabled=False, every_s=0.0, stream=quiet)
    off.update(5)
    off.note("nothing")
    off.close()
    assert quiet.getvalue() == ""
