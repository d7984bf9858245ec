"""Reading records from JSONL, JSON, Parquet and save_to_disk folders, and the errors for bad files."""

import json

import pytest

from stema.data import DataError, read_records

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def write(tmp_path, rows, storage):
    """`rows` stored as `storage` ('jsonl', 'json', 'parquet' or 'disk'); returns the path to read."""
    if storage == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif storage == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
    elif storage == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "data_folder"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


STORAGES = ["jsonl", "json", "parquet", "disk"]


@pytest.mark.parametrize(
    "storage, second_location",
    [("jsonl", "data.jsonl:2"), ("json", "data.json:item 1"), ("parquet", "data.parquet:row 1"), ("disk", "data_folder:row 1")],
)
def test_every_storage_reads_fields_and_locations(tmp_path, storage, second_location):
    records = read_records(write(tmp_path, ROWS, storage))
    assert [record.fields for record in records] == ROWS
    assert records[1].location == f"{tmp_path}/{second_location}"


def test_jsonl_skips_blank_lines_and_counts_physical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n   \n{"text": "b"}\n')
    assert [record.location for record in read_records(path)] == [f"{path}:2", f"{path}:4"]


def test_json_object_holding_one_list_and_json_lines_in_a_json_file(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert [record.fields for record in read_records(wrapped)] == ROWS
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert [record.location for record in read_records(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_dataset_dict_with_one_split_is_read_and_with_several_is_an_error(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(one))
    assert [record.fields for record in read_records(one)] == ROWS
    two = tmp_path / "two"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(two))
    with pytest.raises(DataError, match=r"two: a DatasetDict with splits train, test"):
        read_records(two)


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_records(tmp_path / "missing.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data file extension '\.csv'"):
        read_records(csv)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "no end}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON: Unterminated string"):
        read_records(broken)
    array_line = tmp_path / "array.jsonl"
    array_line.write_text('{"text": "fine"}\n\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"array\.jsonl:3: expected a JSON object .* got list"):
        read_records(array_line)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_records(empty)
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"a": ROWS, "b": ROWS}))
    with pytest.raises(DataError, match=r"two\.json: a JSON object must hold exactly one list .*\(a, b\)"):
        read_records(two_lists)
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"plain_folder: a folder that is not a datasets.save_to_disk folder"):
        read_records(folder)
