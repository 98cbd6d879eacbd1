"""Sources of the text tasks: documents and labelled texts from .txt/.tsv/.csv files, folders, comma
lists and tensorflow-datasets (through tfds.testing.mock_data), and the one-line errors a user
gets for data that cannot be read."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from transformer.data import DataError, LabelledTexts, load_documents, load_labelled

SHARED = ROOT.parent / "shared" / "data"


def _one_line_error(call, *fragments):
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Unlabelled documents
# ---------------------------------------------------------------------------------------------


def test_txt_file_is_one_document_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("ein hund\r\n\n   \nzwei\u2028katzen\nlast".encode())
    # "\r\n" ends a line like "\n"; U+2028 stays inside its line; the split is ignored for local files.
    assert load_documents(str(path), "anything") == ["ein hund", "zwei\u2028katzen", "last"]


def test_folder_is_one_document_per_txt_file_in_name_order(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second\nfile\n\n")
    (folder / "a.txt").write_text("  first file  \n")
    (folder / "empty.txt").write_text("\n \n")  # blank: dropped
    (folder / "notes.md").write_text("not read")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("not read either")
    assert load_documents(str(folder), "train") == ["first file", "second\nfile"]


def test_tables_take_the_named_column(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text('label\tsentence\n0\ta "quoted" word , here\n1\t \n\n1\tlast one\n')
    assert load_documents(str(tsv), "train", text_feature="sentence") == ['a "quoted" word , here', "last one"]
    csv = tmp_path / "t.csv"
    csv.write_bytes('\ufefftext,label\n"one, with a comma",0\n"two\nlines",1\nplain,0\n'.encode())
    assert load_documents(str(csv), "train") == ["one, with a comma", "two\nlines", "plain"]


def test_a_comma_list_concatenates_its_sources_and_the_column_applies_to_tables(tmp_path):
    (tmp_path / "t.tsv").write_text("label\tsentence\n0\tfrom the table\n")
    (tmp_path / "a.txt").write_text("from the text file\nagain\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("from the folder")
    source = f"{tmp_path / 't.tsv'},{tmp_path / 'a.txt'}, {tmp_path / 'd'}"
    assert load_documents(source, "train", text_feature="sentence") == [
        "from the table", "from the text file", "again", "from the folder"]


@pytest.mark.parametrize("setup, source, fragments", [
    (None, "{tmp}/missing.txt", ["missing.txt does not exist"]),
    (None, "./no/such/folder", ["./no/such/folder does not exist"]),
    ({"e.txt": b"\n  \n"}, "{tmp}/e.txt", ["e.txt has no text"]),
    ({"bad.txt": b"fine\nstill fine\nno \xe9 good\n"}, "{tmp}/bad.txt",
     ["bad.txt line 3 is not valid UTF-8 (byte 0xe9 at byte 4 of the line)"]),
    ({"d/a.txt": b"ok", "d/b.txt": b"ok\n\xff\n"}, "{tmp}/d", ["b.txt line 2 is not valid UTF-8"]),
    ({"d/a.md": b"text"}, "{tmp}/d", ["has no .txt files"]),
    ({"t.tsv": b"label\tsentence\n0\thi\n"}, "{tmp}/t.tsv",
     ["t.tsv has no column 'text' (its columns: label, sentence): name the column with --text_feature"]),
    ({"t.tsv": b"label\ttext\n0\thi\n1\tthere\textra\n"}, "{tmp}/t.tsv",
     ["t.tsv line 3 has 3 fields but the header has 2 (label, text): fields are separated by tabs"]),
    ({"t.csv": b""}, "{tmp}/t.csv", ["t.csv is empty: it needs a header line"]),
    ({"t.tsv": b"text\n\xc3(\n"}, "{tmp}/t.tsv", ["t.tsv line 2 is not valid UTF-8"]),
    ({"x.json": b"{}"}, "{tmp}/x.json", ["x.json is not a .txt, .tsv or .csv file or a folder"]),
    ({"a.txt": b"fine\n"}, "{tmp}/a.txt,{tmp}/gone.txt", ["gone.txt does not exist"]),
    (None, " , ", ["no data source given"]),
])
def test_unreadable_documents_are_refused_in_one_line(tmp_path, setup, source, fragments):
    for name, data in (setup or {}).items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    _one_line_error(lambda: load_documents(source.format(tmp=tmp_path), "train"), *fragments)


# ---------------------------------------------------------------------------------------------
# Labelled texts
# ---------------------------------------------------------------------------------------------


def test_table_labels_are_class_names_in_numeric_or_text_order(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("label\tsentence\n10\tten\n2\ttwo\n 2 \ttwo again\n-1\tminus one\n10\t\n")
    got = load_labelled(str(path), "train", text_feature="sentence")
    assert got.class_names == ["-1", "2", "10"]  # numeric: "10" after "2"
    assert got.texts == ["ten", "two", "two again", "minus one", ""]  # every row, the empty text too
    assert got.labels == [2, 1, 1, 0, 2] and len(got) == 5
    path = tmp_path / "t.csv"
    path.write_text("text,sentiment\ngood,pos\nbad,neg\n\"so, so\",neutral\n")
    got = load_labelled(str(path), "train", label_feature="sentiment")
    assert got == LabelledTexts(["good", "bad", "so, so"], [2, 0, 1], ["neg", "neutral", "pos"])


def test_folder_of_class_subfolders(tmp_path):
    for split, files in (("train", {"pos/1.txt": "great\n", "pos/0.txt": "fine", "neg/9.txt": "dull",
                                    "neg/readme.md": "not read", "urls.txt": "not read"}),
                         ("test", {"pos/a.txt": "good", "neg/b.txt": "bad"})):
        for name, text in files.items():
            (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / split / name).write_text(text)
    train = load_labelled(str(tmp_path / "train"), "train")
    assert train == LabelledTexts(["dull", "fine", "great"], [0, 1, 1], ["neg", "pos"])
    # Evaluation data takes the training classes: here in another order, labels follow the names.
    test = load_labelled(str(tmp_path / "test"), "test", class_names=["pos", "neg"])
    assert test == LabelledTexts(["bad", "good"], [1, 0], ["pos", "neg"])


def test_evaluation_labels_map_onto_the_training_classes(tmp_path):
    (tmp_path / "train.tsv").write_text("label\ttext\nb\tone\na\ttwo\nc\tthree\n")
    (tmp_path / "eval.tsv").write_text("label\ttext\nc\tfour\nc\tfive\n")
    train = load_labelled(str(tmp_path / "train.tsv"), "train")
    evaluation = load_labelled(str(tmp_path / "eval.tsv"), "validation", class_names=train.class_names)
    assert evaluation == LabelledTexts(["four", "five"], [2, 2], ["a", "b", "c"])  # one class is enough here
    (tmp_path / "new.tsv").write_text("label\ttext\na\tfine\nd\tunseen\n")
    _one_line_error(lambda: load_labelled(str(tmp_path / "new.tsv"), "validation", class_names=train.class_names),
                    "new.tsv line 3 has label 'd', which the training data does not have (its classes: a, b, c)")


@pytest.mark.parametrize("files, source, fragments", [
    ({"t.tsv": "label\ttext\n1\tone\n1\tuno\n"}, "t.tsv",
     ["t.tsv has 1 class (only '1'): classification needs at least two"]),
    ({"t.tsv": "label\ttext\n"}, "t.tsv", ["t.tsv has a header but no rows"]),
    ({"t.tsv": "label\ttext\n1\tone\n \ttwo\n"}, "t.tsv", ["t.tsv line 3 has no label (column 'label' is empty)"]),
    ({"t.tsv": "label\tsentence\n1\tone\n"}, "t.tsv", ["has no column 'text' (its columns: label, sentence)"]),
    ({"t.tsv": "sentence\ttext\n1\tone\n"}, "t.tsv",
     ["has no column 'label' (its columns: sentence, text): name the column with --label_feature"]),
    ({"a.txt": "no labels\n"}, "a.txt", ["a.txt has no labels: give a .tsv or .csv file with a label column"]),
    ({"d/x.txt": "loose file"}, "d", ["has no subfolders: a labelled folder holds one subfolder"]),
    ({"d/pos/x.txt": "good", "d/neg/y.md": "bad"}, "d", ["neg has no .txt files"]),
    ({"d/pos/x.txt": "good"}, "d", ["folder", "has 1 class (only 'pos')"]),
    ({"a.tsv": "label\ttext\n0\ta\n1\tb\n"}, "a.tsv,a.tsv", ["labelled data comes from one source, not a list"]),
    ({}, "missing.csv", ["missing.csv does not exist"]),
])
def test_unusable_labelled_data_is_refused_in_one_line(tmp_path, files, source, fragments):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    source = ",".join(str(tmp_path / p) for p in source.split(","))
    _one_line_error(lambda: load_labelled(source, "train"), *fragments)


# ---------------------------------------------------------------------------------------------
# The shared corpora, where this machine has them
# ---------------------------------------------------------------------------------------------


def test_sst2_tsv_as_labelled_texts_and_as_documents():
    train_tsv, validation_tsv = SHARED / "sst2" / "train.tsv", SHARED / "sst2" / "validation.tsv"
    if not train_tsv.is_file():
        pytest.skip(f"the SST-2 corpus is not at {SHARED / 'sst2'}")
    train = load_labelled(str(train_tsv), "train", text_feature="sentence", label_feature="label")
    assert len(train.texts) == len(train.labels) == 67_349
    assert train.class_names == ["0", "1"] and sum(train.labels) == 37_569
    assert train.texts[0] == "hide new secretions from the parental units" and train.labels[0] == 0
    validation = load_labelled(str(validation_tsv), "validation", text_feature="sentence",
                               class_names=train.class_names)
    assert len(validation) == 872 and sum(validation.labels) == 444
    en = SHARED / "multi30k" / "en.train.txt"
    if en.is_file():  # pre-training on two corpora at once: the column applies to the table only
        docs = load_documents(f"{train_tsv},{en}", "train", text_feature="sentence")
        assert len(docs) == 67_349 + 29_000 and docs[67_349] == en.read_text().split("\n")[0]


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets, mocked (no network)
# ---------------------------------------------------------------------------------------------

_MOCK_TFDS = r"""
import json, os, sys
import tensorflow as tf
import tensorflow_datasets as tfds
from transformer.data import DataError, load_documents, load_labelled

tmp = sys.argv[1]
results = {}

def check(name, fn):
    try:
        results[name] = {"ok": fn()}
    except DataError as err:
        results[name] = {"error": str(err)}

def raw(name, split, *features):
    ds = tfds.load(name, split=split, download=False)
    return [[ex[f].decode() if isinstance(ex[f], bytes) else int(ex[f]) for f in features] for ex in tfds.as_numpy(ds)]

with tfds.testing.mock_data(num_examples=7):
    lm1b = [t for (t,) in raw("lm1b", "train", "text")]
    check("lm1b", lambda: [load_documents("lm1b", "train"), [t for t in lm1b if t.strip()]])
    check("lm1b_feature", lambda: load_documents("lm1b", "train", text_feature="sentence"))
    check("list", lambda: len(load_documents(f"lm1b,{tmp}/a.txt", "train")) - len([t for t in lm1b if t.strip()]))
    check("sst2_docs", lambda: [load_documents("glue/sst2", "validation", text_feature="sentence"),
                                [t for (t,) in raw("glue/sst2", "validation", "sentence") if t.strip()]])
    check("sst2_idx_docs", lambda: load_documents("glue/sst2", "train", text_feature="idx"))
    def sst2():
        got = load_labelled("glue/sst2", "train", text_feature="sentence", label_feature="label")
        return [got.class_names, [list(p) for p in zip(got.texts, got.labels)], raw("glue/sst2", "train", "sentence", "label")]
    check("sst2", sst2)
    def imdb():
        native = load_labelled("imdb_reviews", "test")
        swapped = load_labelled("imdb_reviews", "test", class_names=["pos", "neg", "unsure"])
        return [native.class_names, native.texts == swapped.texts, native.labels, swapped.labels,
                [list(p) for p in zip(native.texts, native.labels)] == raw("imdb_reviews", "test", "text", "label")]
    check("imdb", imdb)
    check("imdb_unseen", lambda: load_labelled("imdb_reviews", "train", class_names=["pos", "other"]))
    check("imdb_not_label", lambda: load_labelled("imdb_reviews", "train", label_feature="text"))

def unlabelled_test_split(builder, split, **kwargs):  # GLUE's test splits: every label is -1
    return tf.data.Dataset.from_tensor_slices({"sentence": [b"a", b"b"], "label": tf.constant([-1, -1], tf.int64),
                                               "idx": tf.constant([0, 1], tf.int32)})

with tfds.testing.mock_data(as_dataset_fn=unlabelled_test_split):
    check("sst2_test", lambda: load_labelled("glue/sst2", "test", text_feature="sentence"))

# Not mocked: nothing is prepared in an empty data dir, and no download is tried.
check("unprepared", lambda: load_documents("lm1b", "train", tfds_data_dir=f"{tmp}/tfds"))
check("unknown", lambda: load_labelled("no_such_dataset_here", "train", tfds_data_dir=f"{tmp}/tfds"))
print(json.dumps(results, default=vars))
"""


@pytest.fixture(scope="module")
def mocked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tfds")
    (tmp / "a.txt").write_text("one\ntwo\n")
    # In a process of its own, as in tests/run: TensorFlow stays out of the test process.
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _MOCK_TFDS, str(tmp)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _error(result, *fragments):
    assert "error" in result, result
    assert "\n" not in result["error"]
    for fragment in fragments:
        assert fragment in result["error"], result["error"]


def test_tfds_documents(mocked):
    got, expected = mocked["lm1b"]["ok"]
    assert got == expected and len(got) >= 5  # the mock's texts, blank ones dropped
    assert mocked["list"]["ok"] == 2  # lm1b's documents, then the text file's two lines
    got, expected = mocked["sst2_docs"]["ok"]
    assert got == expected and got
    _error(mocked["lm1b_feature"], "tfds dataset 'lm1b' has no feature 'sentence' (its features: text): "
                                   "name the feature with --text_feature")
    _error(mocked["sst2_idx_docs"], "feature 'idx' of tfds dataset 'glue/sst2' is not text")


def test_tfds_labelled(mocked):
    class_names, got, expected = mocked["sst2"]["ok"]
    assert class_names == ["negative", "positive"] and got == expected and len(got) == 7  # labels line up
    native_names, same_texts, native, swapped, lined_up = mocked["imdb"]["ok"]
    assert native_names == ["neg", "pos"] and same_texts and lined_up
    assert swapped == [1 - label for label in native]  # mapped by name onto the training classes
    _error(mocked["imdb_unseen"], "of split 'train' of tfds dataset 'imdb_reviews' has label 'neg', which the "
                                  "training data does not have (its classes: pos, other)")
    _error(mocked["imdb_not_label"], "feature 'text' of tfds dataset 'imdb_reviews' is not a class label",
           "--label_feature")
    _error(mocked["sst2_test"], "split 'test' of tfds dataset 'glue/sst2' has no labels (example 1 has label -1): "
                                "use a labelled split")


def test_tfds_datasets_that_cannot_be_read(mocked):
    _error(mocked["unprepared"], "'lm1b' is not a local file or folder, and tfds cannot read it", "tfds build lm1b")
    _error(mocked["unknown"], "'no_such_dataset_here' is not a local file or folder",
           "give an existing .txt, .tsv or .csv file or folder")
