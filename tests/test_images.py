"""Loading image CSVs: formats, modes, sizes, the split, and each bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, write_csv
from core.errors import UserError
from pipeline.images import ImageData, decode_image, detect_channels, read_table, split_indices


def test_relative_and_absolute_paths_and_labels(tmp_path):
    names = make_images(tmp_path / "a", n=3)
    csv = write_csv(tmp_path / "d.csv", [f"a/{names[0]},7", f"{tmp_path / 'a' / names[1]},8",
                                         f"a/{names[2]},9"])
    table = read_table(csv)
    assert [p.name for p in table.paths] == names and table.labels == [7, 8, 9]


def test_grayscale_detected_only_when_every_image_is(tmp_path):
    names = make_images(tmp_path / "g", n=2)
    make_images(tmp_path / "c", n=1, mode="RGB")
    gray = write_csv(tmp_path / "g.csv", [f"g/{n}" for n in names], "image_path")
    mixed = write_csv(tmp_path / "m.csv", [f"g/{names[0]}", "c/img_000.png"], "image_path")
    assert detect_channels(read_table(gray))[0] == 1
    assert detect_channels(read_table(mixed))[0] == 3


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "I;16", "CMYK"])
def test_any_mode_and_size_becomes_a_square_of_the_requested_channels(tmp_path, mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50), np.uint8))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.convert(mode).save(path)
    assert decode_image(path, 3, 16).shape == (3, 16, 16)
    assert decode_image(path, 1, 8).shape == (1, 8, 8)


def test_center_crop_keeps_the_middle(tmp_path):
    pixels = np.zeros((10, 30), np.uint8)
    pixels[:, 12:18] = 255  # bright inside the middle third, dark at its edges
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 1, 10)[0]
    assert out[:, 2:8].mean() > 200 and out[:, 0].mean() < 50 and out[:, -1].mean() < 50


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(100, 0.1, seed=3)
    again_train, again_val = split_indices(100, 0.1, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert len(val) == 10 and not set(train) & set(val) and len(set(train) | set(val)) == 100
    assert not np.array_equal(val, split_indices(100, 0.1, seed=4)[1])


def test_streamed_and_in_memory_data_agree(tmp_path):
    names = make_images(tmp_path / "s", n=10)
    table = read_table(write_csv(tmp_path / "s.csv", [f"s/{n}" for n in names], "image_path"))
    in_memory = ImageData(table, 1, 16)
    streamed = ImageData(table, 1, 16, num_workers=0, force_stream=True)
    a = torch.cat(list(in_memory.ordered(range(10), 4)))
    b = torch.cat(list(streamed.ordered(range(10), 4)))
    assert torch.equal(a, b) and a.shape == (10, 1, 16, 16)


def bad(tmp_path, rows, header="image_path"):
    return write_csv(tmp_path / "bad.csv", rows, header)


def test_missing_csv(tmp_path):
    with pytest.raises(UserError, match="no such CSV"):
        read_table(tmp_path / "nope.csv")


def test_empty_csv(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_table(tmp_path / "e.csv")


def test_header_without_rows(tmp_path):
    with pytest.raises(UserError, match="no rows"):
        read_table(bad(tmp_path, []))


def test_no_image_path_column(tmp_path):
    with pytest.raises(UserError, match="no 'image_path' column .*columns: file, label"):
        read_table(bad(tmp_path, ["a.png,1"], "file,label"))


def test_missing_image_names_the_row_and_file(tmp_path):
    names = make_images(tmp_path / "i", n=2)
    with pytest.raises(UserError, match=r"row 2: image .*ghost\.png' does not exist"):
        read_table(bad(tmp_path, [f"i/{names[0]}", "i/ghost.png"]))


def test_corrupt_image_names_the_row_and_file(tmp_path):
    names = make_images(tmp_path / "i", n=2)
    (tmp_path / "i" / "broken.png").write_bytes(b"\x89PNG not really")
    table = read_table(bad(tmp_path, [f"i/{names[0]}", "i/broken.png"]))
    with pytest.raises(UserError, match=r"row 2 .*broken\.png.*cannot read image"):
        detect_channels(table)


def test_truncated_image_fails_at_decode_or_is_skipped(tmp_path, capsys):
    names = make_images(tmp_path / "i", n=3)
    data = (tmp_path / "i" / names[1]).read_bytes()
    (tmp_path / "i" / names[1]).write_bytes(data[:60])  # header intact, pixels cut off
    table = read_table(bad(tmp_path, [f"i/{n}" for n in names]))
    with pytest.raises(UserError, match=r"row 2 .*cannot read image"):
        ImageData(table, 1, 16)
    kept = ImageData(table, 1, 16, skip_bad=True)
    assert len(kept) == 2 and kept.table.rows == [0, 2]
    assert "warning: skipping" in capsys.readouterr().err
