"""Prompt templates: the webui's `textual_inversion_templates` set, shipped as our own text files.

Why text files: users know these files by name (`subject_filewords`, `style`, ...) and bring their own
in the same one-prompt-per-line format, so a shipped name and a user's path load the same way.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).with_name("templates")
NAME_KEYWORD = "[name]"
FILEWORDS_KEYWORD = "[filewords]"


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.txt"))


def _template_file(name_or_path: str) -> Path:
    if name_or_path in available_templates():
        return TEMPLATE_DIR / f"{name_or_path}.txt"
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise ValueError(
        f"prompt template {name_or_path!r}: not a shipped template ({', '.join(available_templates())}) "
        "and not an existing file"
    )


def load_template(name_or_path: str) -> list[str]:
    """The template's prompt lines; blank lines are dropped so they can never be drawn as an empty prompt."""
    path = _template_file(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: prompt template is not UTF-8 text ({error})") from error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: prompt template has no prompt lines")
    return lines


def render_prompt(template_line: str, name: str, filewords: str) -> str:
    """Substitute `[filewords]` first, then `[name]`, as the webui does (so a caption may itself mention `[name]`)."""
    return template_line.replace(FILEWORDS_KEYWORD, filewords).replace(NAME_KEYWORD, name)


# Evaluation prompts when a dataset names none: what the embedding was trained to be decides what to ask of it.
EVALUATION_PROMPTS = {
    "subject": ("a photo of [name]", "a painting of [name]", "[name] on a white background"),
    "style": ("a painting in the style of [name]", "a landscape in the style of [name]", "a portrait, [name] style"),
}


def evaluation_prompts(template: str) -> tuple[str, ...]:
    """Style prompts for a style template (`style`, `style_filewords`, a user file named *style*), else subject."""
    return EVALUATION_PROMPTS["style" if "style" in Path(template).stem else "subject"]


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line, as the webui's "prompts from file"; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: prompt file does not exist") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: prompt file is not UTF-8 text ({error})") from error
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
