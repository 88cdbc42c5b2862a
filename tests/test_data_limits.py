"""Memory that does not grow with the data, and images too large to decode.

Quantizing and the quality figures work in batches from uint8 images and give the numbers the
whole-set computation gave; k-NN radii come in blocks of rows; a streamed set's torchrun ranks
decode only their own images; an image whose header claims more than the toolkit's pixel limit
is refused (or skipped) before a pixel is decoded."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import image_tokenizers
import train_vqvae
from conftest import TINY_VQVAE, make_images, run_main, write_csv
from core.errors import UserError
from pipeline import images as images_module
from pipeline import quality, tracking
from pipeline.images import (ImageData, ImageTooLarge, decode_image, detect_channels,
                             fits_in_memory, max_image_pixels, read_source, read_table)
from pipeline.tokenizers import RunTokenizer, log_codes
from test_bad_input import cli_error


def forged_png(path, width, height):
    """A PNG of a few hundred bytes whose header claims width x height grey pixels: its data
    holds the first rows only, enough for anything that trusts the header to allocate it all."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    pack = zlib.compressobj()
    rows = pack.compress(b"\0" * (width + 1) * 4) + pack.flush(zlib.Z_SYNC_FLUSH)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
                     + chunk(b"IEND", b""))
    return path


# memory: quantizing in batches

def test_codes_from_batches_equal_the_whole_split_at_once(store, image_csv):
    model = image_tokenizers.build("vqvae", {"image_size": 16, "channels": 16, "downsample": 4,
                                             "codebook_size": 16, "code_dim": 8,
                                             "n_res_blocks": 1, "in_channels": 1})
    torch.manual_seed(0)
    run_id = tracking.create_run("tokenizer", tags={tracking.TOKENIZER_TAG: "vqvae"})
    tokenizer = RunTokenizer(model.eval(), run_id, torch.device("cpu"))
    source = read_source(image_csv)
    for data in (source.images(1, 16),
                 ImageData(source.table, 1, 16, num_workers=0, force_stream=True)):
        # the old path: the whole split as floats, encoded 16 at a time
        everything = torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255
        expected = tokenizer.encode(everything, 16).numpy()
        codes = log_codes(tokenizer, source, data, "batched", batch_size=16)
        assert codes.dtype == np.uint8  # 16 codes fit a byte
        assert np.array_equal(codes, expected)
    tracking.end_run(run_id)


# memory: k-NN radii in blocks

def test_knn_radii_and_manifolds_in_blocks_equal_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(400, 16)), rng.normal(size=(300, 16)) + 0.2
    whole = lambda a, b: torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    old_radii = lambda f: np.sort(whole(f, f), axis=1)[:, quality.K_NEIGHBOURS]
    old_share = lambda q, r, radii: float((whole(q, r) <= radii[None, :]).any(1).mean())
    old = (old_share(fake, real, old_radii(real)), old_share(real, fake, old_radii(fake)))
    # a set that fits one block gives the whole matrix's very numbers
    assert np.array_equal(quality.knn_radii(real), old_radii(real))
    assert quality.precision_recall(fake, real) == old
    # blocks of 64 rows: the matrix never exists whole
    monkeypatch.setattr(quality, "DISTANCE_BLOCK_BYTES", 8 * 64 * 400)
    assert len(quality._row_blocks(400, 400)) == 7
    np.testing.assert_allclose(quality.knn_radii(real), old_radii(real), rtol=0, atol=1e-12)
    assert quality.precision_recall(fake, real) == old


# memory: the quality figures from uint8 images, in chunks

def decoded(folder, n, seed):
    """n synthetic images written to `folder`, decoded: uint8 (n, 1, 16, 16)."""
    names = make_images(folder, n=n, seed=seed)
    csv = write_csv(folder.parent / f"{folder.name}.csv", [f"{folder.name}/{name}"
                                                           for name in names], "image_path")
    data = ImageData(read_table(csv), 1, 16)
    return data.gather(range(len(data)))


def test_quality_figures_from_uint8_in_chunks_equal_the_whole_float_sets(tmp_path, monkeypatch):
    # batches and chunks of 64 (512 and 2048 by default): 150 images are three chunks
    monkeypatch.setattr(quality, "CLASSIFIER_BATCH", 64)
    monkeypatch.setattr(quality, "CEILING_CHUNK", 64)
    monkeypatch.setattr(quality, "REAL_DRAWS", 4)  # (32) what is compared, not how well
    train, heldout = decoded(tmp_path / "t", 150, 1), decoded(tmp_path / "h", 40, 2)
    unit = lambda images: images.float() / 255
    samples = quality.degrade(unit(train[:50]), "light_blur")
    as_bytes = quality.QualityReference(heldout, train)
    assert as_bytes.train.dtype == torch.uint8  # kept 4x smaller
    assert as_bytes.report(samples) == quality.QualityReference(unit(heldout),
                                                                unit(train)).report(samples)

    reference = quality.QualityReference(heldout, train, [i % 3 for i in range(len(train))])
    blur = lambda x: quality.degrade(x, "heavy_blur")
    # what tokenizer_ceiling computed with every reconstruction in memory at once
    recon = quality.reconstruct_all(blur, unit(train))
    n = min(len(heldout), len(train))
    expected = reference.report(recon[torch.from_numpy(reference.real_subsets(n)[0])])
    means = reference.subset_figures(recon, n)
    expected.update(means, fd_ratio=means["fd"] / expected["fd_real"])
    mse = (quality.reconstruct_all(blur, unit(heldout)) - unit(heldout)).pow(2).mean()
    ceiling = quality.tokenizer_ceiling(blur, reference)
    # psnr: one chunk of held-out images, so the same float32 mean
    assert ceiling.pop("psnr") == pytest.approx(10 * np.log10(1 / mse.item()), rel=1e-12)
    assert ceiling == expected


# memory: torchrun ranks

def test_streaming_ranks_decode_only_their_slice_of_each_batch(image_csv, monkeypatch):
    decoded = []
    real_decode = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image",
                        lambda path, *a: decoded.append(path.name) or real_decode(path, *a))
    data = ImageData(read_table(image_csv), 1, 16, num_workers=0, force_stream=True)
    seen = {}
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        decoded.clear()
        batches = data.batches(range(40), 8, torch.Generator().manual_seed(3), rank, world_size)
        for _ in range(5):  # one epoch
            next(batches)
        seen[rank, world_size] = list(decoded)
    first, second = seen[0, 2], seen[1, 2]
    assert len(first) == len(second) == 20 and not set(first) & set(second)
    assert sorted(first + second) == sorted(seen[0, 1])  # together: one process's epoch


def test_in_memory_budget_counts_every_local_rank(image_csv, monkeypatch):
    table = read_table(image_csv)  # 48 images of 16x16
    monkeypatch.setattr(images_module, "IN_MEMORY_LIMIT_BYTES", 48 * 256)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert fits_in_memory(table, 1, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: two copies
    assert not fits_in_memory(table, 1, 16)
    assert ImageData(table, 1, 16, num_workers=0).images is None  # streamed


# decompression bombs

def test_a_bomb_is_refused_from_its_header(tmp_path, monkeypatch, capsys):
    names = make_images(tmp_path / "i", n=2)
    bomb = forged_png(tmp_path / "i" / "bomb.png", 15000, 12000)
    assert bomb.stat().st_size < 1000
    table = read_table(write_csv(tmp_path / "d.csv", [f"i/{names[0]}", "i/bomb.png",
                                                      f"i/{names[1]}"], "image_path"))
    with pytest.raises(UserError, match=r"row 2 .*bomb\.png.*image too large: 15000x12000 "
                                        r"pixels \(180\.0 megapixels\) is above the limit of "
                                        r"64 megapixels"):
        detect_channels(table)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, 1, 16)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own limit is back in place
    # the streamed path: a worker's refusal becomes the same line, or a skip
    streamed = ImageData(table, 1, 16, num_workers=0, force_stream=True)
    with pytest.raises(UserError, match=r"row 2 .*bomb\.png.*image too large"):
        list(streamed.ordered(range(3), 3))
    kept = ImageData(table, 1, 16, skip_bad=True, num_workers=0, force_stream=True)
    assert len(kept.gather(range(3))) == 2 and kept.skipped == {1}
    assert "warning: skipping" in capsys.readouterr().err
    # the limit is the user's to move
    monkeypatch.setenv("PIPELINE_MAX_IMAGE_PIXELS", "2e8")
    assert max_image_pixels() == 200_000_000
    assert detect_channels(table)[0] == 1  # the header passes now
    monkeypatch.setenv("PIPELINE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="PIPELINE_MAX_IMAGE_PIXELS must be a positive"):
        max_image_pixels()


def test_training_on_a_bomb_fails_in_one_line_or_skips_it(store, tmp_path, capsys):
    names = make_images(tmp_path / "i", n=24)
    forged_png(tmp_path / "i" / "bomb.png", 15000, 12000)
    csv = write_csv(tmp_path / "d.csv", ["i/bomb.png", *(f"i/{n}" for n in names)],
                    "image_path")
    args = ["--path_to_data", str(csv), "--max_steps", "2", "--eval_every", "2",
            "--checkpoint_every", "2", *TINY_VQVAE]
    before = len(tracking.client().search_runs([tracking.experiment_id()]))
    message = cli_error(train_vqvae.main, args, capsys)
    assert "row 1 ('" in message and "bomb.png" in message and "15000x12000" in message
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == before
    run_id = run_main(train_vqvae.main, [*args, "--skip_bad_images"])
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "bomb.png" in err and "image too large" in err
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["num_images"] == "24"
