"""Prompt sources: styles.csv with unquoted commas, JSONL, TXT, and the errors that name file and line."""

from __future__ import annotations

import json

import pytest

from revprompt.generation.prepare import prepare
from revprompt.prompts.prepared import load_split
from revprompt.prompts.sources import (CsvStats, PromptSourceError, bundled_path, normalise, read_prompts,
                                          text_id)
from revprompt.launch.config import load_config

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_styles_csv_recovers_unquoted_commas(tmp_path):
    src = write(tmp_path / "styles.csv", HEADER
                + "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt\n"
                + "39386,Women,Accessories,Bags,Handbags,Brown,Summer,2012,Casual,Lino Perros Women Brown, Beige Handbag\n"
                + "53759,Men,Apparel,Topwear,Tshirts,Grey,Summer,2012,Casual,Puma Men, Grey, Slim T-shirt\n"
                + '1164,Men,Apparel,Topwear,Tshirts,Blue,Summer,2015,Sports,"Quoted, Name Tshirt"\n')
    stats = CsvStats()
    prompts = list(read_prompts(str(src), csv_stats=stats))
    assert [p.text for p in prompts] == ["Turtle Check Men Navy Blue Shirt", "Lino Perros Women Brown, Beige Handbag",
                                         "Puma Men, Grey, Slim T-shirt", "Quoted, Name Tshirt"]
    assert [p.id for p in prompts] == ["15970", "39386", "53759", "1164"]
    assert stats.recovered_commas == 2
    assert prompts[1].attributes["baseColour"] == "Brown" and prompts[1].attributes["usage"] == "Casual"
    assert [p.line for p in prompts] == [2, 3, 4, 5]


def test_bundled_set_has_broken_rows_and_real_vocabulary():
    stats = CsvStats()
    prompts = list(read_prompts("bundled", csv_stats=stats))
    assert len(prompts) == 3000
    assert stats.recovered_commas == 22
    assert {p.attributes["gender"] for p in prompts} == {"Men", "Women", "Boys", "Girls", "Unisex"}
    assert {"Tshirts", "Shirts", "Watches", "Handbags"} <= {p.attributes["articleType"] for p in prompts}
    assert all(p.text for p in prompts)


def test_bundled_set_is_reproducible(tmp_path):
    from revprompt.prompts.fashion import main

    main(["--out", str(tmp_path / "styles.csv")])
    assert (tmp_path / "styles.csv").read_bytes() == bundled_path().read_bytes()


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "bad.txt", b"a red shirt\nblue \xff\xfe jeans\n")
    with pytest.raises(PromptSourceError, match=r"bad\.txt:2: invalid UTF-8"):
        list(read_prompts(str(src)))


def test_missing_column_names_it(tmp_path):
    src = write(tmp_path / "styles.csv", "id,gender\n1,Men\n")
    with pytest.raises(PromptSourceError, match=r"styles\.csv:1: column 'productDisplayName' used by prompts.template"):
        list(read_prompts(str(src)))


def test_short_row_and_bad_json_name_the_line(tmp_path):
    src = write(tmp_path / "styles.csv", HEADER + "1,Men,Apparel\n")
    with pytest.raises(PromptSourceError, match=r"styles\.csv:2: row has 3 fields, the header has 10"):
        list(read_prompts(str(src)))
    src = write(tmp_path / "p.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(PromptSourceError, match=r"p\.jsonl:2: invalid JSON"):
        list(read_prompts(str(src)))


def test_unreadable_file(tmp_path):
    with pytest.raises(PromptSourceError, match="nope.csv: prompt file not found"):
        list(read_prompts(str(tmp_path / "nope.csv")))
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(PromptSourceError, match="dir.txt: cannot read prompt file"):
        list(read_prompts(str(folder)))


def test_jsonl_keeps_attributes_and_template(tmp_path):
    src = write(tmp_path / "p.jsonl", json.dumps({"id": "x1", "prompt": "a red dress", "colour": "Red"}) + "\n\n"
                + json.dumps({"prompt": "blue jeans", "tags": ["denim"]}) + "\n")
    prompts = list(read_prompts(str(src)))
    assert [(p.id, p.text, p.line) for p in prompts] == [("x1", "a red dress", 1), ("", "", 2),
                                                         (text_id("blue jeans"), "blue jeans", 3)]
    assert prompts[0].attributes["colour"] == "Red"
    templated = list(read_prompts(str(src), template="photo of {prompt}"))
    assert templated[0].text == "photo of a red dress"


def test_txt_ids_follow_the_text(tmp_path):
    src = write(tmp_path / "p.txt", "  a red   shirt \n\nA RED SHIRT\n")
    prompts = list(read_prompts(str(src)))
    assert [p.text for p in prompts] == ["a red shirt", "", "A RED SHIRT"]
    assert prompts[0].id == prompts[2].id == text_id("a red shirt")
    assert normalise(" A  RED shirt ") == "a red shirt"


def test_prepare_counts_empty_duplicates_and_long(tmp_path):
    long_prompt = " ".join(["embroidered"] * 90)
    src = write(tmp_path / "p.txt", f"red shirt\n\nRed  Shirt\nblue jeans\n{long_prompt}\n\ngreen cap\n")
    cfg = load_config("tiny", [f"--run.dir={tmp_path / 'run'}", f"--prompts.path={src}", "--prompts.limit=0"])
    report = prepare(cfg)
    assert {k: report[k] for k in ("rows", "empty", "duplicates", "too_long", "kept")} == \
        dict(rows=7, empty=2, duplicates=1, too_long=1, kept=4)
    texts = sorted(p.text for s in ("train", "val", "test") for p in load_split(tmp_path / "run" / "prompts", s))
    assert texts == sorted(["red shirt", "blue jeans", long_prompt, "green cap"])
    assert sum(report["splits"].values()) == 4


def test_prepare_limit_and_duplicate_id(tmp_path):
    src = write(tmp_path / "p.jsonl", "".join(json.dumps({"id": str(i % 3), "prompt": f"item {i}"}) + "\n"
                                              for i in range(5)))
    cfg = load_config("tiny", [f"--run.dir={tmp_path / 'a'}", f"--prompts.path={src}", "--prompts.limit=3"])
    assert prepare(cfg)["kept"] == 3
    cfg = load_config("tiny", [f"--run.dir={tmp_path / 'b'}", f"--prompts.path={src}", "--prompts.limit=0"])
    with pytest.raises(PromptSourceError, match=r"p\.jsonl:4: id '0' already used at line 1"):
        prepare(cfg)
    assert not (tmp_path / "b" / "prompts" / "train.jsonl").exists()


def test_prepared_splits_are_indexed_and_ranges_read_alone(tmp_path):
    from revprompt.generation.job import load_task_samples, plan_shards
    from revprompt.prompts.prepared import iter_split, load_at, load_range, split_size

    cfg = load_config("tiny", [f"--run.dir={tmp_path / 'run'}", "--prompts.limit=300"])
    report = prepare(cfg, chunk=7)  # a chunk size that does not divide the count
    folder = tmp_path / "run" / "prompts"
    for split in ("train", "val", "test"):
        everything = load_split(folder, split)
        assert split_size(folder, split) == report["splits"][split] == len(everything)
        assert [p.id for p in iter_split(folder, split)] == [p.id for p in everything]
        for start, stop in ((0, 1), (5, 17), (len(everything) - 3, len(everything) + 10)):
            assert load_range(folder, split, start, stop) == everything[start:stop]
    train = load_split(folder, "train")
    assert load_at(folder, "train", [0, 5, 16, len(train) - 1]) == [train[i] for i in (0, 5, 16, len(train) - 1)]
    assert not list((tmp_path / "run" / "prompts").glob(".*"))  # no temporary or SQLite file left behind

    # a shard's samples come from its own prompts: prompt t // m, image t % m, as one list of all would give
    counts = {s: split_size(folder, s) for s in ("train", "val", "test")}
    tasks = plan_shards(counts, images_per_prompt=3, shard_size=10)
    train = load_split(folder, "train")
    flat = [(p.id, i) for p in train for i in range(3)]
    got = [(s.prompt.id, s.image_index) for t in tasks if t.split == "train"
           for s in load_task_samples(folder, t, 3, seed=0)]
    assert got == flat
    assert [t.index for t in tasks] == list(range(len(tasks)))
    assert sum(t.size for t in tasks) == 3 * sum(counts.values())
