"""A folder of images as --path_to_data: the file list, class subfolders as labels, the digest,
bad folders, and a tiny end-to-end run whose labels reach the conditional prior."""

import json
import shutil

import pytest

from conftest import make_images, run_main
from core.errors import UserError
from pipeline import tracking
from pipeline.images import read_source, read_table


def class_folder(root):
    """root/bars/*.png and root/blocks/*.png (some in a nested folder), with files read_folder
    must skip: hidden ones, a hidden folder, a non-image file. -> root."""
    make_images(root / "bars", n=20, seed=1)
    make_images(root / "blocks", n=10, seed=2)
    make_images(root / "blocks" / "more", n=10, seed=3)
    make_images(root / ".cache", n=2, seed=4)
    shutil.copy(root / "bars" / "img_000.png", root / "bars" / ".hidden.png")
    (root / "bars" / "notes.txt").write_text("not an image")
    (root / "blocks" / "img_000.png").rename(root / "blocks" / "IMG_000.PNG")
    return root


def inputs(run_id, context):
    """The datasets a run logged as inputs with this context (training, evaluation, ...)."""
    return [i.dataset for i in tracking.client().get_run(run_id).inputs.dataset_inputs
            if {t.key: t.value for t in i.tags}.get("mlflow.data.context") == context]


def test_class_subfolders_become_labels_in_sorted_file_order(tmp_path):
    table = read_table(class_folder(tmp_path / "shapes"))
    relative = [p.relative_to(tmp_path / "shapes").as_posix() for p in table.paths]
    assert relative == sorted(relative, key=lambda r: r.split("/"))
    assert len(relative) == 40 and "blocks/IMG_000.PNG" in relative
    assert "blocks/more/img_009.png" in relative  # a nested folder belongs to its class
    assert not any(".cache" in r or ".hidden" in r or r.endswith(".txt") for r in relative)
    assert table.labels == [r.split("/")[0] for r in relative]
    assert table.labels.count("bars") == 20 and table.labels.count("blocks") == 20
    assert table.rows == list(range(40)) and table.folder


def test_a_folder_without_subfolders_is_unlabelled(tmp_path):
    make_images(tmp_path / "flat", n=5)
    table = read_table(tmp_path / "flat")
    assert table.labels is None and len(table.paths) == 5


def test_the_digest_follows_names_labels_and_bytes_only(tmp_path):
    root = class_folder(tmp_path / "shapes")
    digest = lambda folder=root: read_source(folder).sha256
    first = digest()
    assert digest() == first  # the same tree read twice
    shutil.copytree(root, tmp_path / "elsewhere")
    assert digest(tmp_path / "elsewhere") == first  # the folder's own place is not hashed
    (root / "bars" / "readme.md").write_text("skipped files do not count")
    (root / ".cache" / "img_000.png").write_bytes(b"nor hidden ones")
    assert digest() == first

    image = root / "bars" / "img_003.png"
    original = image.read_bytes()
    image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of one image
    assert digest() != first
    image.write_bytes(original)
    assert digest() == first
    image.rename(root / "blocks" / "img_003.png")  # the same bytes, another class
    moved = digest()
    assert moved != first
    (root / "blocks" / "img_003.png").rename(root / "blocks" / "img_103.png")  # renamed
    assert digest() not in (first, moved)


def test_bad_folders_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no images in the folder or its subfolders"):
        read_table(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="text: no images"):
        read_table(tmp_path / "text")
    make_images(tmp_path / "mixed" / "cats", n=2)
    make_images(tmp_path / "mixed", n=1)
    with pytest.raises(UserError, match=r"1 image\(s\) directly in the folder \(e.g. "
                                        r"'img_000.png'\) beside 1 class subfolder\(s\) \(cats\)"):
        read_table(tmp_path / "mixed")
    with pytest.raises(UserError, match="nowhere: no such CSV file or folder"):
        read_table(tmp_path / "nowhere")
    make_images(tmp_path / "broken" / "a", n=2)
    (tmp_path / "broken" / "a" / "img_001.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken/a/img_001.png: cannot read image"):
        read_source(tmp_path / "broken").channels()
    channels, kept = read_source(tmp_path / "broken").readable(skip_bad=True)  # --skip_bad_images
    assert len(kept.paths) == 1 and kept.labels == ["a"]


def test_an_empty_folder_exits_with_one_line_before_any_run(store, tmp_path, capsys):
    from pipeline.__main__ import main as pipeline_main
    from pipeline.cli import run_cli
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_cli(pipeline_main, ["--path_to_data", str(tmp_path / "empty"), "--out_dir",
                                str(tmp_path / "o"), "--experiment", "folder-empty"])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: no images in the folder" in err[0], err
    assert tracking.client().get_experiment_by_name("folder-empty") is None


def test_a_class_folder_trains_end_to_end_and_labels_the_prior(store, tmp_path):
    import transformer_generation
    from pipeline.__main__ import main as pipeline_main
    from pipeline.generate import LoadedPrior
    root = class_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    argv = ["--path_to_data", str(root), "--out_dir", str(out), "--preset", "tiny",
            "--experiment", "folder-e2e", "--prior.conditional", "--no-prior.log_model",
            "--sample.labels", "all", "--sample.num_samples", "8", "--quality_draws", "1"]
    run_main(pipeline_main, argv)
    summary = json.loads((out / "summary.json").read_text())
    tokenizer_run, prior_run = summary["tokenizer_run_id"], summary["prior_run_id"]
    codes = tracking.load_json_artifact(tokenizer_run, "codes/train.json")
    table = read_table(root)
    assert codes["labels"] == table.labels and codes["csv_sha256"] == read_source(root).sha256
    assert LoadedPrior(prior_run, "cpu").classes == ["bars", "blocks"]
    record = tracking.load_json_artifact(prior_run, summary["generated"].replace(".npy", ".json"))
    assert record["labels"] == ["bars", "blocks"] * 4  # each class in turn
    assert "quality/label_agreement" in summary["metrics"]
    (dataset,) = inputs(summary["pipeline_run_id"], "training")
    assert json.loads(dataset.source)["uri"] == str(root.resolve())
    assert dataset.name == f"{tmp_path.name}/shapes"

    # sampling by class name
    run_main(transformer_generation.main, ["--run_id", prior_run, "--labels", "blocks,bars",
                                           "--name", "by_name", "--no_decode"])
    record = tracking.load_json_artifact(prior_run, "generated/by_name.json")
    assert record["labels"] == ["blocks", "bars"]

    # a held-out folder judges the prior (the real reference: the folder its tokenizer recorded)
    heldout = tmp_path / "heldout"
    make_images(heldout / "bars", n=4, seed=5)
    make_images(heldout / "blocks", n=4, seed=6)
    eval_run = run_main(pipeline_main, ["quality", "--run_id", prior_run, "--path_to_data",
                                        str(heldout), "--num_samples", "8", "--draws", "1",
                                        "--experiment", "folder-e2e"])
    evaluation = tracking.client().get_run(eval_run)
    assert any(name.endswith("label_agreement") for name in evaluation.data.metrics)
    (dataset,) = inputs(eval_run, "evaluation")
    assert json.loads(dataset.source)["uri"] == str(heldout.resolve())

    # the same tree again: the same digest, so every stage is reused
    run_main(pipeline_main, argv)
    again = json.loads((out / "summary.json").read_text())
    assert again["stages"] == {"tokenizer": "reuse", "prior": "reuse"}
