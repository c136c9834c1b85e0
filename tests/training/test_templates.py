from __future__ import annotations

from pathlib import Path

import pytest

from training.templates import available_templates, load_template, render_prompt

SHIPPED = ["hypernetwork", "none", "style", "style_filewords", "subject", "subject_filewords", "tags"]


def test_the_webui_template_set_and_the_tag_caption_template_are_shipped() -> None:
    assert available_templates() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_template_loads_without_blank_lines(name: str) -> None:
    lines = load_template(name)
    assert lines and all(line == line.strip() and line for line in lines)


def test_template_keywords_match_their_purpose() -> None:
    assert load_template("none") == ["picture"]
    assert "a photo of a [name]" in load_template("subject")
    assert "a painting in the style of [name]" in load_template("style")
    for name in ("subject", "style"):
        assert all("[name]" in line and "[filewords]" not in line for line in load_template(name))
    for name in ("subject_filewords", "style_filewords"):
        assert all("[name]" in line and "[filewords]" in line for line in load_template(name))
    assert all("[filewords]" in line and "[name]" not in line for line in load_template("hypernetwork"))
    assert load_template("tags") == ["[name], [filewords]"]  # kohya-style: trigger word, then the tag caption


def test_a_user_file_is_a_template(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("\n  [name] on a beach  \n\n[filewords] by [name]\n", encoding="utf-8")
    assert load_template(str(path)) == ["[name] on a beach", "[filewords] by [name]"]


def test_unknown_empty_and_binary_templates_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'nope'.*not a shipped template.*subject"):
        load_template("nope")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: prompt template has no prompt lines"):
        load_template(str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="binary.txt: prompt template is not UTF-8"):
        load_template(str(binary))


def test_render_prompt_substitutes_both_keywords_every_time() -> None:
    assert render_prompt("a photo of a [name], [filewords]", "mycat", "red, round") == "a photo of a mycat, red, round"
    assert render_prompt("[name] and [name]", "x", "") == "x and x"
    # As in the webui, filewords go in first, so a caption that mentions [name] gets the name too.
    assert render_prompt("[filewords]", "mycat", "[name] in a hat") == "mycat in a hat"
