"""docs/config.md is generated from the pydantic models and must match them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pyimgano_core import config_docs
from pyimgano_core.config_docs import COMMAND, DOC_PATH, Table, _Walker, _render_table, render

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_current():
    current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
    assert current == render(), f"docs/config.md is stale: regenerate it with `{COMMAND}` and commit it"


def test_every_registered_detector_and_dataset_type_is_documented():
    from pyimgano_core.detectors import list_detectors

    text = render()
    for name in list_detectors():
        assert f"`{name}`" in text.split("## `detector.params` for", 1)[1]
    for tag in ("mvtec_ad", "visa", "btad", "manifest", "folder"):
        assert f"### `dataset` with `type: {tag}`" in text
    assert "| `calibration.holdout_fraction` | `float` | `0.1` | > `0`; < `1` | share of normal training images kept out of fitting |" in text


# A stand-in for nested detector parameters (coreset sub-model, kNN index as a discriminated union):
# the generator must document them from the types alone.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Coreset(_Strict):
    """How the memory bank is subsampled."""

    ratio: float = Field(0.1, gt=0, le=1, description="share of training patches kept")
    method: Literal["exact", "chunked", "random"] = "exact"


class _Exact(_Strict):
    """Exact search."""

    kind: Literal["exact"] = "exact"


class _PcaIvf(_Strict):
    """PCA-projected IVF lists, exact re-rank.

    Attributes
    ----------
    nlist : int or None
        k-means lists (None: 4*sqrt(entries)).
    """

    kind: Literal["pca_ivf"]
    nlist: int | None = Field(None, ge=1)
    pca_dim: int = Field(64, ge=1, description="dimensions of the coarse search")


class _Params(_Strict):
    coreset: _Coreset = Field(default_factory=_Coreset)
    knn: Annotated[_Exact | _PcaIvf, Field(discriminator="kind")] = Field(default_factory=_Exact)
    image_size: int | tuple[int, int] | Literal["auto"] = 256
    layers: list[str] = ["layer2", "layer3"]


def _lines(model, prefix="detector.params.") -> str:
    table = Table("t", "T", "")
    _Walker().rows(model, prefix, table)
    return "\n".join(_render_table(table, 2))


def test_nested_models_and_discriminated_unions_are_walked():
    text = _lines(_Params)
    assert "| `detector.params.coreset` | `section` | (section defaults) |  | How the memory bank is subsampled. |" in text
    assert "| `detector.params.coreset.ratio` | `float` | `0.1` | > `0`; <= `1` | share of training patches kept |" in text
    assert '| `detector.params.coreset.method` | `str` | `"exact"` | `"exact"`, `"chunked"`, `"random"` |  |' in text
    assert ("| `detector.params.knn` | one of the sections below, chosen by `kind` | `{kind: exact}` | "
            "[`exact`](#detector-params-knn-kind-exact), [`pca_ivf`](#detector-params-knn-kind-pca-ivf) |  |") in text
    assert "### `detector.params.knn` with `kind: pca_ivf`" in text
    # the tag first; a description from the numpy docstring when the Field has none
    pca = text.split("with `kind: pca_ivf`")[1]
    assert pca.index("`detector.params.knn.kind`") < pca.index("`detector.params.knn.nlist`")
    assert "| `detector.params.knn.nlist` | `int \\| null` | `null` | >= `1` | k-means lists (None: 4*sqrt(entries)). |" in pca
    assert '| `detector.params.image_size` | `int \\| tuple[int, int] \\| "auto"` | `256` |' in text
    assert '| `detector.params.layers` | `list[str]` | `["layer2", "layer3"]` |' in text


def test_a_union_member_shared_by_several_tables_is_documented_once():
    walker, first, second = _Walker(), Table("a", "A", ""), Table("b", "B", "")
    walker.rows(_Params, "detector.params.", first)
    walker.rows(_Params, "detector.params.", second)
    assert len(first.children) == 2 and second.children == []
    assert second.rows[2][3] == first.rows[2][3]  # the second table links to the first one's member tables


def test_check_mode_reports_a_stale_file_with_the_command(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert config_docs.main(["--out", str(stale)]) == 0
    assert config_docs.main(["--check", "--out", str(stale)]) == 0


def test_importing_the_generator_does_not_import_torch():
    code = "import sys, pyimgano_core.config_docs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_enums_are_choices_and_plain_unions_of_models_get_one_table_each():
    import enum

    class Mode(enum.Enum):
        A = 1
        B = 2

    class _M1(_Strict):
        x: int = 0

    class _M2(_Strict):
        y: str = "y"

    class _P(_Strict):
        mode: Mode = Mode.A
        either: _M1 | _M2 = Field(default_factory=_M1)

    text = _lines(_P, "")
    assert "| `mode` | `int` | `1` | `1`, `2` |  |" in text
    assert "| `either` | one of the sections below | (section defaults) | [`_M1`](#either-m1), [`_M2`](#either-m2) |  |" in text
    assert "### `either` with `_M2`" in text and "| `either.y` | `str` | `\"y\"` |  |  |" in text
