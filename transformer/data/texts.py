"""Sources of text for the text tasks: unlabelled documents (a language model, a masked language
model) and labelled texts (classification), from tensorflow-datasets or local files. TensorFlow is
imported only where tfds reads a dataset.

A source names one of:
- a local `.txt` file: one document per line (blank lines are skipped; not for labelled texts);
- a local `.tsv` or `.csv` file whose first line names its columns: the text (and the label) of a
  row are in the columns named by text_feature (and label_feature). A .tsv row is one line split
  at tabs, with no quoting (the GLUE files); a .csv file follows the csv module's default dialect
  (quoted fields may hold commas and line breaks). A byte-order mark before the header is ignored;
- a local folder: unlabelled, each `.txt` file in it is one document (in order of file name);
  labelled, each subfolder is a class, named by the subfolder, and each `.txt` file in it is one
  example. Other files, and subfolders of unlabelled folders, are not read;
- otherwise, a tensorflow-datasets name such as `lm1b` or `glue/sst2` (text in the feature named
  text_feature; labels in a ClassLabel feature named label_feature).
A name is local if it exists on disk, or if it ends with .txt, .tsv or .csv or starts with "/",
"." or "~" (then it must exist). A local source holds one split: the caller names one source per
split (e.g. one for training and one for evaluation), and `split` is used only for tfds.
Unlabelled sources may be listed with commas (no spaces needed; a name cannot contain a comma):
their documents are concatenated in the order given. text_feature applies to the tables and the
tfds datasets of the list; a .txt file or a folder has no columns."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from transformer.data.corpus import DataError, _import_tfds, read_text_lines

TABLES = (".tsv", ".csv")
LOCAL_SUFFIXES = (".txt",) + TABLES
_TFDS_BATCH = 1024  # examples read from tfds at a time: far faster than one by one


@dataclass
class LabelledTexts:
    """Texts and their labels: labels[i] is the index in class_names of the class of texts[i]."""

    texts: list[str]
    labels: list[int]
    class_names: list[str]

    def __len__(self):
        return len(self.texts)


# ---------------------------------------------------------------------------------------------
# Telling local sources from tfds names
# ---------------------------------------------------------------------------------------------


def _parts(source: str) -> list[str]:
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not parts:
        raise DataError(f"no data source given ({source!r}): name a .txt, .tsv or .csv file, a folder or a tfds dataset")
    return parts


def _local_path(part: str) -> str | None:
    """The path of a local source, or None for a tfds name."""
    path = os.path.expanduser(part)
    if os.path.exists(path):
        return path
    if part.lower().endswith(LOCAL_SUFFIXES) or part.startswith(("/", ".", "~")):
        raise DataError(f"{part} does not exist: give an existing .txt, .tsv or .csv file or folder")
    return None


def _txt_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(".txt") and os.path.isfile(os.path.join(folder, f)))


def _file_text(path: str) -> str:
    """A file as one text: its lines (read_text_lines: UTF-8 errors name the line) joined with "\\n",
    whitespace at both ends removed."""
    return "\n".join(read_text_lines(path)).strip()


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _read_table(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header of a .tsv/.csv file and its rows as (line number, fields); empty lines skipped.
    A row with more or fewer fields than the header raises DataError naming its line."""
    lines = read_text_lines(path)
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")  # a byte-order mark (spreadsheets write one)
    rows = []
    if path.lower().endswith(".tsv"):
        rows = [(n, line.split("\t")) for n, line in enumerate(lines, start=1) if line]
    else:
        # Lines go back to the csv reader with their ends, so that a quoted field keeps its line breaks.
        reader = csv.reader(line + "\n" for line in lines)
        while True:
            n = reader.line_num + 1  # a quoted field can span lines: a row is named by its first
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DataError(f"{path} line {reader.line_num} is not valid CSV ({err})") from None
            if fields:
                rows.append((n, fields))
    if not rows:
        raise DataError(f"{path} is empty: it needs a header line naming its columns, then one row per example")
    (_, header), rows = rows[0], rows[1:]
    for n, fields in rows:
        if len(fields) != len(header):
            sep = "tabs" if path.lower().endswith(".tsv") else "commas"
            raise DataError(f"{path} line {n} has {len(fields)} fields but the header has {len(header)} "
                            f"({', '.join(header)}): fields are separated by {sep}")
    return header, rows


def _column(path: str, header: list[str], name: str, option: str) -> int:
    if name not in header:
        raise DataError(f"{path} has no column {name!r} (its columns: {', '.join(header)}): "
                        f"name the column with {option}")
    return header.index(name)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets
# ---------------------------------------------------------------------------------------------


def _tfds_load(name: str, split: str, data_dir: str | None):
    """(dataset, tfds module, dataset info) of a prepared tfds dataset; never downloads."""
    tfds = _import_tfds()
    try:
        ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False, with_info=True)
    except Exception as err:  # tfds raises several types for "not prepared" / "unknown"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{name!r} is not a local file or folder, and tfds cannot read it as a dataset's split {split!r} "
            f"({first_line}). Prepare it where there is network with `tfds build {name}` (then pass "
            "--tfds_data_dir if not the default), or give an existing .txt, .tsv or .csv file or folder"
        ) from None
    return ds, tfds, info


def _tfds_feature(info, name: str, feature: str, option: str, kind, what: str):
    features = info.features
    if feature not in features:
        raise DataError(f"tfds dataset {name!r} has no feature {feature!r} (its features: "
                        f"{', '.join(features.keys())}): name the feature with {option}")
    if not isinstance(features[feature], kind):
        raise DataError(f"feature {feature!r} of tfds dataset {name!r} is not {what} "
                        f"({type(features[feature]).__name__}): name another with {option}")
    return features[feature]


def _decode(raw: bytes, n: int, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"example {n} of {where} is not valid UTF-8: the dataset must hold UTF-8 text") from None


def _tfds_documents(name: str, split: str, text_feature: str, data_dir: str | None) -> list[str]:
    ds, tfds, info = _tfds_load(name, split, data_dir)
    _tfds_feature(info, name, text_feature, "--text_feature", tfds.features.Text, "text")
    where = f"split {split!r} of tfds dataset {name!r}"
    docs = []
    for texts in tfds.as_numpy(ds.map(lambda ex: ex[text_feature]).batch(_TFDS_BATCH)):
        docs.extend(_decode(raw, len(docs) + 1, where) for raw in texts)
    return [d for d in docs if d.strip()]


def _tfds_labelled(name: str, split: str, text_feature: str, label_feature: str, data_dir: str | None,
                   class_names: list[str] | None) -> LabelledTexts:
    ds, tfds, info = _tfds_load(name, split, data_dir)
    _tfds_feature(info, name, text_feature, "--text_feature", tfds.features.Text, "text")
    label = _tfds_feature(info, name, label_feature, "--label_feature", tfds.features.ClassLabel, "a class label")
    where = f"split {split!r} of tfds dataset {name!r}"
    names = list(label.names)
    if class_names is None:
        _check_classes(names, f"tfds dataset {name!r}")
        index = list(range(len(names)))
    else:  # the classes of the training data: this split's labels go by name onto them
        index = [class_names.index(c) if c in class_names else -1 for c in names]
    texts, labels = [], []
    pairs = ds.map(lambda ex: (ex[text_feature], ex[label_feature])).batch(_TFDS_BATCH)
    for raw_texts, raw_labels in tfds.as_numpy(pairs):
        for raw, value in zip(raw_texts, raw_labels.tolist()):
            n = len(texts) + 1
            if value == -1:  # GLUE's test splits hold -1 for every label (the labels are not published)
                raise DataError(f"{where} has no labels (example {n} has label -1): "
                                "use a labelled split, such as validation")
            if not 0 <= value < len(names):
                raise DataError(f"example {n} of {where} has label {value}, not one of the {len(names)} "
                                f"classes of feature {label_feature!r}")
            if index[value] < 0:
                raise DataError(f"example {n} of {where} has label {names[value]!r}, which the training data does "
                                f"not have (its classes: {', '.join(class_names)})")
            texts.append(_decode(raw, n, where))
            labels.append(index[value])
    if not texts:
        raise DataError(f"{where} has no examples")
    return LabelledTexts(texts, labels, list(names if class_names is None else class_names))


# ---------------------------------------------------------------------------------------------
# Unlabelled documents
# ---------------------------------------------------------------------------------------------


def _local_documents(path: str, text_feature: str) -> list[str]:
    if os.path.isdir(path):
        files = _txt_files(path)
        if not files:
            raise DataError(f"folder {path} has no .txt files: it needs one document per .txt file")
        docs = [_file_text(f) for f in files]
    elif path.lower().endswith(".txt"):
        docs = read_text_lines(path)
    elif path.lower().endswith(TABLES):
        header, rows = _read_table(path)
        column = _column(path, header, text_feature, "--text_feature")
        docs = [fields[column] for _, fields in rows]
    else:
        raise DataError(f"{path} is not a .txt, .tsv or .csv file or a folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} has no text (it is empty or blank)")
    return docs


def load_documents(source: str, split: str, *, text_feature: str = "text",
                   tfds_data_dir: str | None = None) -> list[str]:
    """The documents of `source` (see the module's docstring): one or more sources separated by
    commas, their documents concatenated in order. Blank documents (whitespace only) are dropped; a
    source with none left raises DataError. `split` chooses the split of a tfds dataset; a local
    source is one split already and ignores it."""
    docs = []
    for part in _parts(source):
        path = _local_path(part)
        if path is not None:
            docs.extend(_local_documents(path, text_feature))
        else:
            found = _tfds_documents(part, split, text_feature, tfds_data_dir)
            if not found:
                raise DataError(f"split {split!r} of tfds dataset {part!r} has no text")
            docs.extend(found)
    return docs


# ---------------------------------------------------------------------------------------------
# Labelled texts
# ---------------------------------------------------------------------------------------------


def _check_classes(names: list[str], where: str) -> None:
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DataError(f"{where} has {len(names)} class{'es' if len(names) != 1 else ''} ({found}): "
                        "classification needs at least two")


def _sorted_classes(values: set[str]) -> list[str]:
    """Class names in order: numeric when every name is an integer ("2" before "10"), else by text."""
    try:
        return sorted(values, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(values)


def _labelled_from_names(texts: list[str], names: list[str], where: list[str], source: str,
                         class_names: list[str] | None) -> LabelledTexts:
    """Texts with labels given by class name; where[i] says where example i is, for errors."""
    if class_names is None:
        class_names = _sorted_classes(set(names))
        _check_classes(class_names, source)
    index = {c: i for i, c in enumerate(class_names)}
    for name, at in zip(names, where):
        if name not in index:
            raise DataError(f"{at} has label {name!r}, which the training data does not have "
                            f"(its classes: {', '.join(class_names)})")
    return LabelledTexts(texts, [index[n] for n in names], list(class_names))


def _table_labelled(path: str, text_feature: str, label_feature: str,
                    class_names: list[str] | None) -> LabelledTexts:
    header, rows = _read_table(path)
    text = _column(path, header, text_feature, "--text_feature")
    label = _column(path, header, label_feature, "--label_feature")
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    names = [fields[label].strip() for _, fields in rows]
    for (n, _), name in zip(rows, names):
        if not name:
            raise DataError(f"{path} line {n} has no label (column {label_feature!r} is empty)")
    return _labelled_from_names([fields[text] for _, fields in rows], names,
                                [f"{path} line {n}" for n, _ in rows], path, class_names)


def _folder_labelled(path: str, class_names: list[str] | None) -> LabelledTexts:
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"folder {path} has no subfolders: a labelled folder holds one subfolder of .txt files per class")
    texts, names, where = [], [], []
    for c in classes:
        files = _txt_files(os.path.join(path, c))
        if not files:
            raise DataError(f"folder {os.path.join(path, c)} has no .txt files: each class subfolder needs "
                            "one .txt file per example")
        texts.extend(_file_text(f) for f in files)
        names.extend([c] * len(files))
        where.extend([f"folder {os.path.join(path, c)}"] * len(files))
    return _labelled_from_names(texts, names, where, f"folder {path}", class_names)


def load_labelled(source: str, split: str, *, text_feature: str = "text", label_feature: str = "label",
                  tfds_data_dir: str | None = None, class_names: list[str] | None = None) -> LabelledTexts:
    """The labelled texts of one source (see the module's docstring; not a list): a .tsv/.csv file
    (a label is the text of its label column, surrounding whitespace removed; an empty one raises
    DataError), a folder of class subfolders, or a tfds dataset (its ClassLabel names; a split
    whose labels are -1, as GLUE's test splits, raises DataError: it has no labels).

    Without class_names (the training data): the classes are the tfds ClassLabel names in their
    order, or else the distinct labels sorted (numerically when all are integers); fewer than two
    raise DataError. With class_names (those of the training data, for another split): labels are
    indices into class_names, matched by name, and a label not among them raises DataError naming
    it. Texts are kept as they are, empty ones included. `split` chooses the split of a tfds
    dataset; a local source ignores it."""
    parts = _parts(source)
    if len(parts) > 1:
        raise DataError(f"labelled data comes from one source, not a list: {source!r}")
    path = _local_path(parts[0])
    if path is None:
        return _tfds_labelled(parts[0], split, text_feature, label_feature, tfds_data_dir, class_names)
    if os.path.isdir(path):
        return _folder_labelled(path, class_names)
    if path.lower().endswith(TABLES):
        return _table_labelled(path, text_feature, label_feature, class_names)
    if path.lower().endswith(".txt"):
        raise DataError(f"{path} has no labels: give a .tsv or .csv file with a label column, or a folder "
                        "with one subfolder of .txt files per class")
    raise DataError(f"{path} is not a .tsv or .csv file or a folder")
