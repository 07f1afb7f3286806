"""Inputs that used to be silently wrong: 16-bit / float / palette / alpha images, text fields that
are not text, media given as a bare path, an empty batch, and images that do not decode."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.data import load_train_rows
from unified_tte.errors import DataError, InputError
from unified_tte.model.media import open_image, to_rgb
from unified_tte.model.zoo import tiny_qwen2vl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sixteen_bit(value_left: int, value_right: int, size=56) -> Image.Image:
    pixels = np.full((size, size), value_left, dtype=np.uint16)
    pixels[:, size // 2:] = value_right
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return image


def test_sixteen_bit_images_are_scaled_not_clipped_white(tmp_path):
    path = tmp_path / "scan.png"
    sixteen_bit(30000, 60000).save(path)
    rgb = np.asarray(open_image(str(path), 0))
    assert rgb.shape == (56, 56, 3)
    assert rgb[0, 0].tolist() == [117, 117, 117] and rgb[0, -1].tolist() == [233, 233, 233]   # x / 257


def test_two_different_sixteen_bit_images_embed_differently(tmp_path):
    tte = UnifiedTTE(tiny_qwen2vl())
    paths = []
    for name, values in (("a.png", (2000, 50000)), ("b.png", (50000, 2000))):
        sixteen_bit(*values).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    a, b = tte.embed([TTEInput("scan", [paths[0]]), TTEInput("scan", [paths[1]])])
    assert float(a @ b) < 0.999   # whitened to the same image they were 0.9998 apart
    prompts = tte.encoder.encode([TTEInput("x", [paths[0]]), TTEInput("x", [paths[1]])])
    assert not torch.equal(prompts[0].pixel_values, prompts[1].pixel_values)


def test_float_palette_and_alpha_images_keep_their_content():
    floats = Image.fromarray(np.array([[0.0, 0.5], [1.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats, "x"))[:, :, 0].tolist() == [[0, 128], [255, 0]]
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba, "x")).tolist() == [[[255, 255, 255], [10, 20, 30]]]   # on white
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette, "x")).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_an_image_with_no_pixels_is_refused_by_item():
    with pytest.raises(InputError, match=r"input 3: .*no pixels \(0x0\)"):
        open_image(Image.new("RGB", (0, 0)), 3)


@pytest.mark.parametrize("field, value, shown", [
    ("qry", 12345, "int 12345"), ("qry", {"x": 1}, "dict {'x': 1}"), ("pos_text", [1, 2], "list [1, 2]"),
    ("neg_text", 3.5, "float 3.5"),
])
def test_text_fields_that_are_not_text_are_named_not_stringified(tmp_path, field, value, shown):
    rows = [{"qry": "a cat", "pos_text": "a photo of a cat"} for _ in range(3)]
    rows[1][field] = value
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"train.jsonl line 2: field '{field}' must be text \(a string\), got {re.escape(shown)}"):
        load_train_rows(path)
    loaded = load_train_rows(path, skip_bad=True)
    assert len(loaded) == 2 and len(loaded.skipped) == 1 and field in loaded.skipped[0]


def test_parquet_float_and_list_columns_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"qry": [1.5, float("nan")], "pos_text": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"train.parquet row 0: field 'qry' must be text .* got float 1.5"):
        load_train_rows(path)
    pq.write_table(pa.table({"qry": ["q", "r"], "pos_text": [["a"], ["b"]]}), path)
    with pytest.raises(DataError, match=r"row 0: field 'pos_text' must be text .* got list"):
        load_train_rows(path)


def test_an_image_that_does_not_decode_is_found_at_load_time(tmp_path):
    (tmp_path / "fine.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_bytes(b"this is not a png")
    rows = [{"qry": "q", "qry_image_path": name, "pos_text": "p"} for name in ("ok.png", "fake.png", "fine.png")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: field 'qry_image_path': .*fake.png: not a readable image"):
        load_train_rows(path)
    loaded = load_train_rows(path, skip_bad=True)
    assert [r.id for r in loaded] == ["train:1"] and len(loaded.skipped) == 2


def test_media_given_as_one_path_is_one_image_and_bad_members_are_named(tmp_path):
    Image.new("RGB", (56, 56), (9, 9, 9)).save(tmp_path / "one.png")
    item = TTEInput("x", images=str(tmp_path / "one.png"))
    assert item.images == [str(tmp_path / "one.png")]
    assert TTEInput("x", images=None).images == []
    with pytest.raises(InputError, match="TTEInput.text must be a string, got int"):
        TTEInput(123)
    with pytest.raises(InputError, match="TTEInput.images must be a list"):
        TTEInput("x", images=7)
    tte = UnifiedTTE(tiny_qwen2vl())
    with pytest.raises(InputError, match="input 1: an image is None"):
        tte.embed([TTEInput("fine"), TTEInput("x", images=[None])])


def test_an_empty_batch_gives_an_empty_result():
    tte = UnifiedTTE(tiny_qwen2vl())
    emb, traces = tte.think_then_embed([])
    assert emb.shape == (0, tte.stack.config.hidden_size) and emb.dtype == torch.float32 and traces == []
    assert tte.embed([]).shape == (0, tte.stack.config.hidden_size)
