"""Training data: find and read it, and fingerprint what was read. No torch.

The launcher reads and validates the data once before any worker starts, so
a bad line fails in a second with its file and line number instead of inside
eight ranks after model loading. The workers never read the source: they load the
tokenized data cache the launcher writes from these rows (data/cache.py).

Sources: a .jsonl, .json (a list, or JSON lines), .csv (header row) or .parquet
file; a folder of such files (read in name order, not recursively); a folder
written by `datasets.save_to_disk`; or a Hugging Face Hub dataset id
(`org/name`, its train split) that is not a local path.

What the examples may look like, and the canonical kinds they become, is in
data/formats.py.
"""

from __future__ import annotations

import contextvars

import csv
import hashlib
import json
import re
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.data import formats
from ftlaunch.data.formats import DATA_FORMAT_CHOICES, Row
from ftlaunch.errors import UserError
from ftlaunch.hashing import update_with_file

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_SUFFIXES = SUFFIXES + (".txt", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml", ".xlsx")
_WHAT_WE_READ = ("ftlaunch reads .jsonl, .json, .csv and .parquet files, a folder of them, a "
                 "folder written by datasets' save_to_disk, or a Hugging Face Hub dataset id "
                 "(org/name)")


@dataclass(frozen=True)
class Dataset:
    path: Path | str  # the resolved local file or folder, or the Hub dataset id
    format: str       # the source format: one of formats.DATA_FORMATS
    kind: str         # formats.KINDS: conversational | prompt_completion | text | ...
    rows: tuple[dict, ...]  # canonical rows of that kind
    fingerprint: str  # "sha256:..." over the bytes read, or "hub:<datasets fingerprint>"

    def __len__(self) -> int:
        return len(self.rows)

    def unpaired(self) -> "Dataset":
        """Preference pairs as unpaired examples (KTO's), two per pair."""
        kind, rows = formats.unpair(self.kind, self.rows)
        return dataclasses.replace(self, kind=kind, rows=rows)


# ---------------------------------------------------------------- entry point

# The flag the file came with, for the messages (--data, or --eval-data for the eval file).
_FLAG: contextvars.ContextVar[str] = contextvars.ContextVar("flag", default="--data")


def _flag() -> str:
    return _FLAG.get()


def peek_kind(source: str | Path, format: str = "auto") -> str:
    """The canonical kind (formats.KINDS) of `source`'s data, from its first example: of a
    .jsonl file only its first line is read; anything else is read whole (and checked)."""
    if format != "auto":
        if format not in formats.KINDS:
            raise UserError(f"data.format {format!r} is not one of "
                            f"{', '.join(DATA_FORMAT_CHOICES)}.")
        return formats.KINDS[format]
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "")
            row = json.loads(first)
            if isinstance(row, dict):
                return formats.KINDS[formats.detect(Row(f"{path}, line 1", row))]
        except (OSError, ValueError, UserError):
            pass  # reading it whole says what is wrong, with its line
    return load(source, format).kind


def load(source: str | Path, format: str = "auto", system_prompt: str | None = None,
         flag: str = "--data") -> Dataset:
    """Read, check and canonicalize every example of `source`; any problem is a UserError
    naming `flag`."""
    token = _FLAG.set(flag)
    try:
        return _load(source, format, system_prompt)
    finally:
        _FLAG.reset(token)


def _load(source: str | Path, format: str, system_prompt: str | None) -> Dataset:
    if format not in DATA_FORMAT_CHOICES:
        raise UserError(f"data.format {format!r} is not one of {', '.join(DATA_FORMAT_CHOICES)}.")
    text = str(source)
    local = Path(text).expanduser()
    if local.is_file() or (local.is_dir() and not _is_saved_dataset(local)):
        if local.is_file():
            _check_suffix(local)
        files = [local] if local.is_file() else _data_files(local)
        return _from_files(local, files, format, system_prompt)
    if local.is_dir():
        label, columns, rows = _read_saved(local)
        origin, digest = local.resolve(), fingerprint(local)
    elif _looks_like_hub_id(text):
        label, columns, rows, digest = _read_hub(text)
        origin = text
    else:
        raise UserError(f"{_flag()} {text}: no such file or folder. {_WHAT_WE_READ}.")
    return _build(label, columns, rows, format, system_prompt, origin, digest)


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes; for a folder, of the relative names and bytes of the files
    `load` reads from it (every file, for a save_to_disk folder), in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        _hash_file(digest, path)
        return "sha256:" + digest.hexdigest()
    if _is_saved_dataset(path):
        files = sorted((p for p in path.rglob("*") if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
    else:
        files = _data_files(path)
    for file in files:
        name = file.relative_to(path).as_posix().encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        _hash_file(digest, file)
    return "sha256:" + digest.hexdigest()


def _hash_file(digest, path: Path) -> None:
    try:
        update_with_file(digest, path)
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None


# ---------------------------------------------------------------- sources

def _looks_like_hub_id(text: str) -> bool:
    if not _HUB_ID.fullmatch(text) or text.startswith("."):
        return False
    if Path(text).suffix.lower() in _FILE_SUFFIXES:
        return False  # a file name that is not there, not a Hub id
    return not Path(text.split("/")[0]).exists()  # data/train.jsonl-like: a missing local path


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SAVED_MARKERS)


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{_flag()} {path}: cannot read {path.suffix or 'suffix-less'} files; "
                        f"{_WHAT_WE_READ}.")


def _data_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in SUFFIXES), key=lambda p: p.name)
    if not files:
        raise UserError(f"{_flag()} {folder}: this folder holds no .jsonl, .json, .csv or .parquet "
                        "files (sub-folders are not searched) and is not a folder written by "
                        "datasets' save_to_disk.")
    families = {_family(p) for p in files}
    if len(families) > 1:
        found = ", ".join(sorted({p.suffix.lower() for p in files}))
        raise UserError(f"{_flag()} {folder}: the folder mixes file types ({found}); put files of "
                        "one type (JSON / JSON lines, CSV or Parquet) in a data folder.")
    return files


def _family(path: Path) -> str:
    suffix = path.suffix.lower()
    return "json" if suffix in (".json", ".jsonl") else suffix


def _from_files(label_path: Path, files: list[Path], format: str,
                system_prompt: str | None) -> Dataset:
    """Read each file, tell the format from each file's first example, and require one."""
    rows: list[Row] = []
    first_format: tuple[str, str] | None = None  # (format, where)
    for file in files:
        file_columns, file_rows = _read_file(file)
        if not file_rows:
            continue
        detected = format if format != "auto" else formats.detect(file_rows[0])
        if file_columns is not None:
            formats.check_columns(file, file_columns, detected, _flag())
        if format == "auto":
            if first_format is None:
                first_format = (detected, file_rows[0].where)
            elif detected != first_format[0]:
                raise UserError(f"{_flag()} {label_path}: {first_format[1]} is {first_format[0]} data "
                                f"but {file_rows[0].where} is {detected} data; a dataset holds "
                                "one format. Split the files, or set --set data.format=NAME "
                                "to check all of them against one.")
        rows.extend(file_rows)
    return _build(str(label_path), None, rows, format, system_prompt, label_path.resolve(),
                  fingerprint(label_path))


def _read_file(path: Path) -> tuple[set[str] | None, list[Row]]:
    """The rows of one file, and its column names for CSV and Parquet (None for JSON)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".json" and _starts_with(path, b"["):
        return None, _read_json_array(path)
    return None, _read_jsonl(path)


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(prefix)


def _not_text(path: Path) -> str:
    return (f"{path} is not UTF-8 text (a binary file, or another encoding): ftlaunch reads "
            f"UTF-8 .jsonl, .json and .csv text or .parquet; save it as UTF-8, or pass another {_flag()}.")


def _read_json_array(path: Path) -> list[Row]:
    """A .json file holding one list of examples; errors name list positions ("item N")."""
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(_not_text(path)) from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}).") from None
    rows = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{path}, item {index}: expected a JSON object, got "
                            f"{type(item).__name__}.")
        rows.append(Row(f"{path}, item {index}", item))
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    if number == 1 and path.suffix.lower() == ".json" and _starts_with(path, b"{"):
                        _one_object(path)
                    raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg} at "
                                    f"column {exc.colno}).") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}, line {number}: expected a JSON object, got "
                                    f"{type(row).__name__}.")
                rows.append(Row(f"{path}, line {number}", row))
    except UnicodeDecodeError:
        raise UserError(_not_text(path)) from None
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    return rows


def _one_object(path: Path) -> None:
    """A pretty-printed .json object: say what shape we read instead of 'line 1: bad JSON'."""
    try:
        json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        return  # really broken; the caller reports the line
    raise UserError(f"{path} holds a single JSON object; a .json data file is a list of "
                    "examples ([{...}, {...}]) or one example object per line (JSON lines).")


def _read_csv(path: Path) -> tuple[set[str], list[Row]]:
    """CSV with a header row. Errors name spreadsheet rows: the header is row 1."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are normal in training data
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            try:
                header = reader.fieldnames
                for number, record in enumerate(reader, start=2):
                    if None in record:
                        raise UserError(f"{path}, row {number}: {len(header) + len(record[None])} "
                                        f"fields but the header row has {len(header)}.")
                    rows.append(Row(f"{path}, row {number}", _csv_cells(record)))
            except csv.Error as exc:
                raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({exc}).") from None
    except UnicodeDecodeError:
        raise UserError(_not_text(path)) from None
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    return set(header or ()), rows


def _csv_cells(record: dict) -> dict:
    """Cells are strings; chat columns may hold their list as JSON text (a preference
    column only when it is a list of messages: its text may start with "[" too)."""
    row = dict(record)
    for key in ("messages", "conversations", "prompt", "chosen", "rejected", "completion"):
        cell = row.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                value = json.loads(cell)
            except ValueError:
                continue  # the format check reports it is not a list
            if key in ("messages", "conversations") or (
                    isinstance(value, list) and value
                    and all(isinstance(v, dict) and {"role", "content"} <= set(v) for v in value)):
                row[key] = value
    return row


def _read_parquet(path: Path) -> tuple[set[str], list[Row]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{path} cannot be read as a Parquet file ({exc}).") from None
    rows = [Row(f"{path}, row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    return set(table.column_names), rows


def _read_saved(folder: Path) -> tuple[str, set[str], list[Row]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - any failure here is a folder the user handed us
        raise UserError(f"{_flag()} {folder} looks like a datasets save_to_disk folder but cannot "
                        f"be loaded ({type(exc).__name__}: {exc}).") from None
    label = str(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{_flag()} {folder} is a saved DatasetDict with splits "
                            f"{', '.join(loaded) or '(none)'} but no `train` split; save the "
                            "split to train on (dataset_dict[NAME].save_to_disk(...)) and pass "
                            "that folder.")
        loaded = loaded["train"]
        label = f"{folder} (split train)"
    return label, set(loaded.column_names), _dataset_rows(label, loaded)


def _read_hub(dataset_id: str) -> tuple[str, set[str], list[Row], str]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo or split
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{_flag()} {dataset_id}: no such local file or folder, and the Hugging "
                        f"Face Hub dataset {dataset_id} (train split) could not be reached "
                        f"({type(exc).__name__}: {reason}). Check the id and your network (or "
                        "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), or pass a local .jsonl, .csv "
                        "or .parquet file instead.") from None
    label = f"Hub dataset {dataset_id}"
    return (label, set(loaded.column_names), _dataset_rows(label, loaded),
            "hub:" + str(loaded._fingerprint))


def _dataset_rows(label: str, loaded) -> list[Row]:
    return [Row(f"{label}, row {i}", row) for i, row in enumerate(loaded, start=1)]


# ---------------------------------------------------------------- dataset

def _build(label: str, columns: set[str] | None, rows: list[Row], format: str,
           system_prompt: str | None, origin: Path | str, digest: str) -> Dataset:
    if not rows:
        raise UserError(f"{_flag()} {label} holds no examples: give a file with one example per "
                        f"line (JSON Lines), or another {_flag()}.")
    detected, kind, checked = formats.canonicalize(label, columns, rows, format, system_prompt,
                                                   _flag())
    return Dataset(path=origin, format=detected, kind=kind, rows=checked, fingerprint=digest)
