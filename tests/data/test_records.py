import json
from pathlib import Path

import pandas as pd
import pytest

from internal_policy_lens.data.records import DataError, read_records, write_records_jsonl

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
KEYS = ["sample_id", "prompt", "response", "answer", "line"]


def write_jsonl(path: Path, rows, blank_after=()) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the real benchmark files ---


@pytest.mark.parametrize(
    "name, count",
    [
        ("aime_2024", 30),
        ("aime_2025", 30),
        ("amc2023", 40),
        ("math500", 500),
        ("deepmath-5k", 5000),
    ],
)
def test_real_files(name, count):
    path = DATA / f"{name}.jsonl"
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    records = read_records(path)
    assert len(records) == count
    assert all(list(r) == KEYS for r in records)
    ids = [r["sample_id"] for r in records]
    assert len(set(ids)) == count
    assert len({type(i) for i in ids}) == 1
    assert [r["line"] for r in records] == list(range(1, count + 1))
    for r in records:
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["prompt"])
        assert isinstance(r["answer"], str) and r["answer"]
        assert r["response"] is None
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in records] == [x["reward_model"]["ground_truth"] for x in raw]
    if name == "aime_2024":  # unique extra_info.index >= 0: used as ids
        assert ids == [x["extra_info"]["index"] for x in raw]
    else:  # extra_info.index is -1 everywhere: row numbers
        assert ids == list(range(count))


# --- simple layouts ---


@pytest.mark.parametrize("prompt_key", ["prompt", "problem", "question"])
@pytest.mark.parametrize("response_key", ["response", "completion", "output", None])
def test_simple_jsonl(tmp_path, prompt_key, response_key):
    rows = [
        {prompt_key: f"What is {i}+{i}?", "answer": 2 * i, "solution": "ignored"} for i in range(3)
    ]
    if response_key:
        for i, row in enumerate(rows):
            row[response_key] = f"It is {2 * i}."
    records = read_records(write_jsonl(tmp_path / "simple.jsonl", rows))
    assert records == [
        {
            "sample_id": i,
            "prompt": f"What is {i}+{i}?",
            "response": f"It is {2 * i}." if response_key else None,
            "answer": str(2 * i),
            "line": i + 1,
        }
        for i in range(3)
    ]


def test_field_precedence(tmp_path):
    row = {
        "question": "q",
        "problem": "p",
        "prompt": "first",
        "final_answer": "3",
        "ground_truth": "2",
        "answer": "1",
        "output": "o",
        "completion": "c",
        "response": "r",
    }
    (record,) = read_records(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert (record["prompt"], record["response"], record["answer"]) == ("first", "r", "1")
    row = {"question": "q", "final_answer": 1.5, "reward_model": {"ground_truth": "gt"}}
    (record,) = read_records(write_jsonl(tmp_path / "b.jsonl", [row]))
    assert (record["prompt"], record["answer"]) == ("q", "gt")
    row = {"question": "q", "final_answer": 1.5, "solution": "s", "prompt": None}
    (record,) = read_records(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert (record["prompt"], record["answer"]) == ("q", "1.5")
    (record,) = read_records(write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "solution": "s"}]))
    assert record["answer"] is None


def test_messages_keep_role_and_content_only(tmp_path):
    prompt = [{"role": "user", "content": "hi", "name": "x"}]
    (record,) = read_records(write_jsonl(tmp_path / "m.jsonl", [{"prompt": prompt}]))
    assert record["prompt"] == [{"role": "user", "content": "hi"}]


def test_json_array_and_extension_case(tmp_path):
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b"}]
    path = tmp_path / "arr.JSON"
    path.write_text(json.dumps(rows, indent=2))
    records = read_records(path)
    assert [r["prompt"] for r in records] == ["a", "b"]
    assert [r["line"] for r in records] == [2, 6]  # line each object starts on
    lines_path = write_jsonl(tmp_path / "lines.json", rows)
    assert [r["prompt"] for r in read_records(lines_path)] == ["a", "b"]
    upper = write_jsonl(tmp_path / "UP.JSONL", rows)
    assert [r["answer"] for r in read_records(upper)] == ["1", None]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a"}, {"prompt": "b"}], blank_after={0})
    records = read_records(path)
    assert [(r["sample_id"], r["line"]) for r in records] == [(0, 1), (1, 3)]


@pytest.mark.parametrize("with_response", [True, False])
def test_csv(tmp_path, with_response):
    path = tmp_path / "d.csv"
    header = "id,question,answer" + (",response" if with_response else "")
    rows = ['a,"two\nlines",5', "b,plain,"]
    if with_response:
        rows = [rows[0] + ",resp", rows[1] + ","]
    path.write_text("\n".join([header, *rows]) + "\n")
    if with_response:  # row b's response cell is empty: it counts as none, with a warning
        with pytest.warns(UserWarning, match="1 of 2 records have an empty response"):
            records = read_records(path)
    else:
        records = read_records(path)
    assert records == [
        {
            "sample_id": "a",
            "prompt": "two\nlines",
            "response": "resp" if with_response else None,
            "answer": "5",
            "line": 2,
        },
        {"sample_id": "b", "prompt": "plain", "response": None, "answer": None, "line": 4},
    ]


def test_csv_missing_value_markers_are_missing_cells(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["id,question,answer,response", "a,1+1?,NaN,2", "b,2+2?,4,NA", "c,3+3?,,", "d,4+4?,8,9"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="2 of 4 records have an empty response"):
        records = read_records(path)
    assert [r["answer"] for r in records] == [None, "4", None, "8"]
    assert [r["response"] for r in records] == ["2", None, None, "9"]


def test_parquet(tmp_path):
    frame = pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}]],
            "response": ["r0", None],
            "reward_model": [{"ground_truth": "7"}, {"ground_truth": "8"}],
            "extra_info": [{"index": 11}, {"index": 10}],
        }
    )
    frame.to_parquet(tmp_path / "d.parquet")
    records = read_records(tmp_path / "d.parquet")
    assert records == [
        {
            "sample_id": 11,
            "prompt": [{"role": "user", "content": "q0"}],
            "response": "r0",
            "answer": "7",
            "line": 0,
        },
        {
            "sample_id": 10,
            "prompt": [{"role": "user", "content": "q1"}],
            "response": None,
            "answer": "8",
            "line": 1,
        },
    ]
    simple = pd.DataFrame({"problem": ["a", "b"], "answer": [1, 2], "id": [5, 6]})
    simple.to_parquet(tmp_path / "s.parquet")
    records = read_records(tmp_path / "s.parquet")
    assert [(r["sample_id"], r["prompt"], r["answer"]) for r in records] == [
        (5, "a", "1"),
        (6, "b", "2"),
    ]
    assert all(type(r["sample_id"]) is int for r in records)


# --- responses.jsonl round trip ---


def test_round_trip(tmp_path):
    records = [
        {"sample_id": "0:0", "prompt": "p\u2028q\x85", "response": "r", "answer": "1", "line": 1},
        {
            "sample_id": "0:1",
            "prompt": [{"role": "user", "content": "ü"}],
            "response": None,
            "answer": None,
            "line": 2,
        },
    ]
    out = write_records_jsonl(records, tmp_path / "run" / "responses.jsonl")
    assert out == tmp_path / "run" / "responses.jsonl"
    back = read_records(out)
    assert [{k: v for k, v in r.items() if k != "line"} for r in back] == [
        {k: v for k, v in r.items() if k != "line"} for r in records
    ]
    lines = out.read_text(encoding="utf-8").splitlines()  # U+2028 is escaped: still one a line
    assert [json.loads(line)["prompt"] for line in lines] == ["p\u2028q\x85", records[1]["prompt"]]
    assert "\u00fc" in lines[1]  # non-ASCII text is written as UTF-8
    write_records_jsonl(back[:1], out)  # replaces the file; no temp files left behind
    assert len(read_records(out)) == 1
    assert [p.name for p in out.parent.iterdir()] == ["responses.jsonl"]


def test_write_rejects_records_without_prompt(tmp_path):
    with pytest.raises(ValueError, match="record 0"):
        write_records_jsonl([{"sample_id": 1}], tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


# --- sample ids ---


def ids_of(tmp_path, rows):
    return [r["sample_id"] for r in read_records(write_jsonl(tmp_path / "ids.jsonl", rows))]


def test_id_fields_in_order(tmp_path):
    rows = [
        {"prompt": "a", "sample_id": "s", "id": 1, "index": 2},
        {"prompt": "b", "id": 3, "index": 4},
        {"prompt": "c", "index": 5},
    ]
    assert ids_of(tmp_path, rows) == ["s", "3", "5"]  # mixed types: all str
    assert ids_of(tmp_path, rows[1:]) == [3, 5]


def test_extra_info_index(tmp_path):
    rows = [
        {"prompt": "a", "extra_info": {"index": 7}},
        {"prompt": "b", "extra_info": {"index": 3}},
    ]
    assert ids_of(tmp_path, rows) == [7, 3]
    rows[1]["extra_info"]["index"] = 7  # not unique: row numbers
    assert ids_of(tmp_path, rows) == [0, 1]
    rows[1]["extra_info"]["index"] = -1  # negative: row numbers
    assert ids_of(tmp_path, rows) == [0, 1]
    rows[1]["extra_info"] = {}  # missing on one record: row numbers
    assert ids_of(tmp_path, rows) == [0, 1]


def test_duplicate_ids(tmp_path):
    rows = [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}, {"prompt": "c", "id": 1}]
    with pytest.raises(DataError, match=r"ids\.jsonl:3: duplicate sample_id 1 \(first on line 1\)"):
        ids_of(tmp_path, rows)
    rows = [{"prompt": "a", "id": "1"}, {"prompt": "b", "id": 1}]  # equal once made str
    with pytest.raises(DataError, match=r"ids\.jsonl:2: duplicate sample_id '1'"):
        ids_of(tmp_path, rows)


def test_bad_id_type(tmp_path):
    with pytest.raises(DataError, match=r"ids\.jsonl:1: .*integers or strings"):
        ids_of(tmp_path, [{"prompt": "a", "id": [1]}])


# --- max_samples ---


def test_max_samples(tmp_path):
    rows = [{"prompt": str(i), "extra_info": {"index": 100 + i}} for i in range(5)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    records = read_records(path, max_samples=2)
    assert [r["sample_id"] for r in records] == [100, 101]
    assert len(read_records(path, max_samples=50)) == 5
    assert read_records(path, max_samples=0) == []
    with pytest.raises(ValueError, match="max_samples"):
        read_records(path, max_samples=-1)


# --- errors ---


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found; check the path") as e:
        read_records(tmp_path / "nope.jsonl")
    one_line(e)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder\.jsonl: is a directory; check the path"):
        read_records(tmp_path / "folder.jsonl")


def test_empty_file_and_no_records(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no records"):
        read_records(tmp_path / "blank.jsonl")
    (tmp_path / "header.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"header\.csv: no records"):
        read_records(tmp_path / "header.csv")
    (tmp_path / "arr.json").write_text("[]")
    with pytest.raises(DataError, match=r"arr\.json: no records"):
        read_records(tmp_path / "arr.json")


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON \(Expecting value") as e:
        read_records(path)
    one_line(e)
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read_records(path)


def test_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "arr.jsonl", [{"prompt": "a"}, [1, 2]])
    with pytest.raises(DataError, match=r"arr\.jsonl:2: expected a JSON object, got a JSON array"):
        read_records(path)


def test_no_prompt(tmp_path):
    path = write_jsonl(tmp_path / "np.jsonl", [{"prompt": "a"}, {"solution": "s", "answer": "1"}])
    pattern = r'np\.jsonl:2: record has no prompt.*"prompt", "problem" or "question"'
    with pytest.raises(DataError, match=pattern):
        read_records(path)
    pd.DataFrame({"answer": ["1", "2"]}).to_parquet(tmp_path / "np.parquet")
    with pytest.raises(DataError, match=r"np\.parquet: row 0: record has no prompt"):
        read_records(tmp_path / "np.parquet")


@pytest.mark.parametrize(
    "prompt, pattern",
    [
        ([{"role": "user"}], r"prompt\[0\] is not a chat message.*role.*content"),
        ([{"role": "user", "content": 3}], r"prompt\[0\] is not a chat message"),
        (["hi"], r"prompt\[0\] is not a chat message"),
        ([], r'"prompt" is a list \(empty\)'),
        (5, r'"prompt" is a int; make it a string or a list'),
    ],
)
def test_bad_prompt(tmp_path, prompt, pattern):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: " + pattern):
        read_records(path)


def test_bad_response_and_answer(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(DataError, match=r'r\.jsonl:1: "completion" is a int; make it a string'):
        read_records(path)
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "answer": ["1"]}])
    with pytest.raises(DataError, match=r'a\.jsonl:1: "answer" is a list'):
        read_records(path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    pattern = r'data\.txt: unsupported file type "\.txt"; use one of \.jsonl, \.json, \.parquet'
    with pytest.raises(DataError, match=pattern):
        read_records(tmp_path / "data.txt")


def test_unparseable_parquet_and_csv(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet") as e:
        read_records(tmp_path / "bad.parquet")
    one_line(e)
    (tmp_path / "bad.csv").write_text("prompt,answer\na,1\nb,2,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: cannot parse CSV .*line 3") as e:
        read_records(tmp_path / "bad.csv")
    one_line(e)


def test_not_utf8(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8"):
        read_records(tmp_path / "latin.jsonl")


def test_no_doubled_word_in_json_errors(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "unterminated\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "Unterminated string starting at column" in str(err.value)
    assert "at at" not in str(err.value)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_empty_responses_count_as_none_in_every_format(tmp_path, fmt):
    rows = [
        {"problem": "1+1?", "response": "2"},
        {"problem": "2+2?", "response": ""},
        {"problem": "3+3?", "response": "  "},
    ]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    with pytest.warns(UserWarning, match=r"2 of 3 records have an empty response \(first on"):
        records = read_records(path)
    assert [r["response"] for r in records] == ["2", None, None]
