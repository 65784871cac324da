"""Importers: public dataset formats in, the event contract out, and errors that point at the bad line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from recflow.errors import InputFileError
from recflow.events.contract import EVENT_SCHEMA
from recflow.events.importers import import_mapped_csv, import_movielens, import_retailrocket, parse_mapping


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(name).to_pylist() for name in table.column_names), strict=True))


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- MovieLens -------------------------------------------------------------------------------------------------


def test_ml_100k_u_data(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t5\t891717742\n22\t377\t1\t878887116\n")
    table = import_movielens(path)
    assert table.schema.equals(EVENT_SCHEMA)
    assert rows(table) == [
        ("196", "242", "click", at(1997, 12, 4, 15, 55, 49), 3.0),
        ("186", "302", "purchase", at(1998, 4, 4, 19, 22, 22), 5.0),
        ("22", "377", "view", at(1997, 11, 7, 7, 18, 36), 1.0),
    ]


def test_ml_latest_ratings_csv_with_half_stars(tmp_path: Path) -> None:
    text = "userId,movieId,rating,timestamp\n1,1,4.5,964982703\n1,3,0.5,964981247\n2,5,2.5,964982224\n"
    table = import_movielens(write(tmp_path / "ratings.csv", text))
    assert table.column("action").to_pylist() == ["add_to_cart", "view", "view"]
    assert table.column("value").to_pylist() == [4.5, 0.5, 2.5]
    assert table.column("user_id").to_pylist() == ["1", "1", "2"]


def test_ml_1m_ratings_dat(tmp_path: Path) -> None:
    table = import_movielens(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::4::978302109\n"))
    assert rows(table) == [
        ("1", "1193", "purchase", at(2000, 12, 31, 22, 12, 40), 5.0),
        ("1", "661", "add_to_cart", at(2000, 12, 31, 22, 35, 9), 4.0),
    ]


def test_a_folder_and_a_renamed_file_are_recognised(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t2\t4\t881250949\n")
    assert import_movielens(tmp_path).num_rows == 1
    assert import_movielens(write(tmp_path / "my-export.txt", "1::2::4::881250949\n")).num_rows == 1


def test_higher_ratings_map_to_heavier_actions_and_the_mapping_can_be_replaced(tmp_path: Path) -> None:
    lines = "".join(f"1\t{rating}\t{rating}\t881250949\n" for rating in range(1, 6))
    path = write(tmp_path / "u.data", lines)
    assert import_movielens(path).column("action").to_pylist() == ["view", "view", "click", "add_to_cart", "purchase"]
    custom = {1: "view", 2: "view", 3: "view", 4: "click", 5: "click"}
    assert import_movielens(path, rating_actions=custom).column("action").to_pylist() == ["view"] * 3 + ["click"] * 2


def test_a_rating_without_an_action_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4,964982703\n1,2,7,964982703\n")
    with pytest.raises(InputFileError, match=r"line 3: rating 7\.0 .* rating_actions"):
        import_movielens(path)


def test_a_missing_rating_is_passed_on_as_null_for_the_store_to_reject(tmp_path: Path) -> None:
    table = import_movielens(write(tmp_path / "u.data", "1\t2\t\t881250949\n1\t3\t4\t881250949\n"))
    assert table.num_rows == 2
    assert table.column("action").to_pylist() == [None, "add_to_cart"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("u.data", "1\t2\t3\t881250949\n1\t2\t3\n", r"line 2: 3 field\(s\) where 4 were expected"),
        ("u.data", "1\t2\t3\t881250949\n1\t2\tgood\t881250949\n", r"line 2: column 'rating' has 'good'.*a number"),
        ("ratings.dat", "1::2::3::881250949\n1::2::3::soon\n", r"line 2: column 'ts' has 'soon'.*an integer"),
        ("ratings.csv", "user,movie,stars,time\n1,2,3,4\n", r"needs the header userId,movieId,rating,timestamp"),
        ("notes.txt", "hello world\n", r"unknown MovieLens format"),
        ("empty.data", "", r"is empty"),
    ],
)
def test_bad_movielens_files_say_what_is_wrong(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(InputFileError, match=message):
        import_movielens(write(tmp_path / name, text))


def test_missing_movielens_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        import_movielens(tmp_path / "u.data")
    with pytest.raises(InputFileError, match=r"folder without u\.data or ratings\.csv or ratings\.dat"):
        import_movielens(tmp_path)


def test_a_bad_line_deep_in_a_large_file_is_found(tmp_path: Path) -> None:
    lines = ["1\t2\t3\t881250949\n"] * 300_000
    lines[250_000] = "1\t2\t3\n"
    with pytest.raises(InputFileError, match="line 250001:"):
        import_movielens(write(tmp_path / "u.data", "".join(lines)))


@pytest.mark.movielens
def test_real_movielens_100k(movielens_dir: Path) -> None:
    table = import_movielens(movielens_dir)
    assert table.num_rows == 100_000
    assert len(table.column("user_id").unique()) == 943
    assert len(table.column("item_id").unique()) == 1682
    assert table.column("action").null_count == 0


# --- RetailRocket ----------------------------------------------------------------------------------------------

RETAILROCKET = (
    "timestamp,visitorid,event,itemid,transactionid\n"
    "1433221332117,257597,view,355908,\n"
    "1433224214164,992329,addtocart,248676,\n"
    "1433221999827,111016,transaction,318965,4000\n"
)


def test_retailrocket_events(tmp_path: Path) -> None:
    table = import_retailrocket(write(tmp_path / "events.csv", RETAILROCKET))
    assert table.schema.equals(EVENT_SCHEMA)
    assert rows(table) == [
        ("257597", "355908", "view", datetime(2015, 6, 2, 5, 2, 12, 117000, tzinfo=UTC), None),
        ("992329", "248676", "add_to_cart", datetime(2015, 6, 2, 5, 50, 14, 164000, tzinfo=UTC), None),
        ("111016", "318965", "purchase", datetime(2015, 6, 2, 5, 13, 19, 827000, tzinfo=UTC), None),
    ]
    assert import_retailrocket(tmp_path).equals(table)  # the folder works too


def test_retailrocket_unknown_event_passes_through_for_the_store_to_reject(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", RETAILROCKET + "1433221999827,1,remove,2,\n")
    assert import_retailrocket(path).column("action").to_pylist()[-1] == "remove"


def test_retailrocket_missing_column_lists_the_columns_present(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", "timestamp,visitor,event,itemid\n1,2,view,3\n")
    with pytest.raises(InputFileError, match=r"needs column\(s\) visitorid; the file has timestamp, visitor, event"):
        import_retailrocket(path)


# --- mapped CSV ------------------------------------------------------------------------------------------------

MAPPED = (
    "customer,sku,kind,when,amount,ref\n"
    "c1,s1,pv,2024-01-01T10:00:00Z,3,r1\n"
    "c2,s2,buy,2024-01-01 11:00:00.500+01:00,,r2\n"
    "c3,s3,cart,1704103200,2.5,r3\n"
    "c4,s4,pv,1704103200123,1,r4\n"
)
MAPPING = {"user_id": "customer", "item_id": "sku", "action": "kind", "timestamp": "when", "value": "amount"}


def test_mapped_csv_with_iso_and_epoch_timestamps(tmp_path: Path) -> None:
    table = import_mapped_csv(
        write(tmp_path / "shop.csv", MAPPED), MAPPING, action_map={"pv": "view", "buy": "purchase"}
    )
    assert table.schema.equals(EVENT_SCHEMA)
    assert rows(table) == [
        ("c1", "s1", "view", at(2024, 1, 1, 10), 3.0),
        ("c2", "s2", "purchase", datetime(2024, 1, 1, 10, 0, 0, 500000, tzinfo=UTC), None),
        ("c3", "s3", "cart", at(2024, 1, 1, 10), 2.5),  # unmapped: the store rejects it with a reason
        ("c4", "s4", "view", datetime(2024, 1, 1, 10, 0, 0, 123000, tzinfo=UTC), 1.0),
    ]


def test_mapped_csv_constant_action_event_id_and_explicit_unit(tmp_path: Path) -> None:
    path = write(tmp_path / "orders.csv", "customer,sku,ts,ref\nc1,s1,1704103200000,o1\nc2,s2,5000,o2\n")
    mapping = parse_mapping(["user_id=customer", "item_id=sku", "action==purchase", "timestamp=ts", "event_id=ref"])
    table = import_mapped_csv(path, mapping, timestamp_unit="ms")
    assert table.column("action").to_pylist() == ["purchase", "purchase"]
    assert table.column("event_id").to_pylist() == ["o1", "o2"]
    assert table.column("timestamp").to_pylist() == [at(2024, 1, 1, 10), datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)]
    assert table.column("value").null_count == 2


def test_mapped_csv_keeps_rows_with_empty_fields_for_the_store_to_reject(tmp_path: Path) -> None:
    path = write(tmp_path / "shop.csv", "customer,sku,kind,when\n,s1,pv,\nc2,s2,pv,1704103200\n")
    table = import_mapped_csv(path, {"user_id": "customer", "item_id": "sku", "action": "kind", "timestamp": "when"})
    assert table.num_rows == 2
    assert table.column("user_id").to_pylist() == ["", "c2"]
    assert table.column("timestamp").to_pylist() == [None, at(2024, 1, 1, 10)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("customer,sku,kind,when\nc1,s1,pv,2024-01-01T10:00:00\n", r"line 2: column 'when' .* with an offset"),
        ("customer,sku,kind,when\nc1,s1,pv,1\nc1,s1,pv,tomorrow\n", r"line 3: column 'when' has 'tomorrow'"),
        ("customer,sku,kind,when,amount\nc1,s1,pv,1,lots\n", r"line 2: column 'amount' has 'lots'.*not a number"),
        ("customer,sku,type,when\nc1,s1,pv,1\n", r"needs column\(s\) kind; the file has customer, sku, type, when"),
        ("customer,sku,kind,when\nc1,s1,pv,1\nc1,s1\n", r"line 3: 2 field\(s\) where 4 were expected"),
    ],
)
def test_bad_mapped_csv_says_which_line_or_column(tmp_path: Path, text: str, message: str) -> None:
    mapping = dict(MAPPING) if "amount" in text else {k: v for k, v in MAPPING.items() if k != "value"}
    with pytest.raises(InputFileError, match=message):
        import_mapped_csv(write(tmp_path / "shop.csv", text), mapping)


def test_mapped_csv_needs_the_required_fields_and_a_known_unit(tmp_path: Path) -> None:
    path = write(tmp_path / "shop.csv", MAPPED)
    with pytest.raises(InputFileError, match="the mapping has no action, timestamp"):
        import_mapped_csv(path, {"user_id": "customer", "item_id": "sku"})
    with pytest.raises(InputFileError, match="timestamp unit 'days'"):
        import_mapped_csv(path, MAPPING, timestamp_unit="days")
    with pytest.raises(InputFileError, match="does not exist"):
        import_mapped_csv(tmp_path / "missing.csv", MAPPING)


def test_parse_mapping() -> None:
    assert parse_mapping(["user_id=customer", " item_id = sku ", "action==view"]) == {
        "user_id": "customer",
        "item_id": "sku",
        "action": "=view",
    }
    with pytest.raises(InputFileError, match=r"bad mapping 'user_id': expected FIELD=COLUMN"):
        parse_mapping(["user_id"])
    with pytest.raises(InputFileError, match=r"unknown contract field\(s\) customer_id .* user_id"):
        parse_mapping(["customer_id=customer"])
    with pytest.raises(InputFileError, match="names 'user_id' twice"):
        parse_mapping(["user_id=a", "user_id=b"])


def test_recflow_import_csv_with_action_renames_writes_the_event_file(tmp_path: Path) -> None:
    """Regression: `recflow import csv` raised ImportError (importers imported from events.contract after the
    layout change) and, before that, TypeError (parse_mapping(..., fields=None) for --action); found by mypy."""
    from typer.testing import CliRunner

    from recflow.cli import app
    from recflow.events.fileio import read_event_file

    source = write(tmp_path / "shop.csv", "customer,sku,kind,when\nc1,s1,buy,1704103200\nc2,s2,pv,1704103201\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tmp_path / "events.parquet"
    args = ["import", "csv", str(source), "--out", str(out), "--params", str(tmp_path / "params.yaml")]
    args += ["--map", "user_id=customer", "--map", "item_id=sku", "--map", "action=kind", "--map", "timestamp=when"]
    result = CliRunner().invoke(app, [*args, "--action", "buy=purchase", "--action", "pv=view"])
    assert result.exit_code == 0, result.output
    table, rejected = read_event_file(out)
    assert rejected == []
    assert table.column("action").to_pylist() == ["purchase", "view"]
