"""Writes translation records of country names, from the ISO 3166 names that the `pycountry`
package ships and their translations in its gettext catalogues (the iso-codes project's
translations, LGPL-2.1): {"source_language": "English", "target_language": "German",
"source": "Germany", "target": "Deutschland", ...}, in both directions. `posttrain data
template --task translation` turns them into instruction pairs. Deterministic, offline.

    python examples/make_translation_data.py countries.jsonl
    posttrain data template --source countries.jsonl --task translation --output translation_sft.jsonl
    posttrain sft --data translation_sft.jsonl --model smollm2-135m --output-dir outputs/translation

Only names that the catalogue translates, and whose translation differs from the English name,
are written: a name the catalogue leaves alone ("Canada" in French) teaches no translation.
"""

from __future__ import annotations

import argparse
import gettext
import json
from pathlib import Path

import pycountry

LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "pl", "ru")
"""ISO 639-1 codes of the catalogues used by default; each translates 130–250 country names."""


def language_name(code: str) -> str:
    """English name of an ISO 639-1 language ("nl" → "Dutch", not "Dutch; Flemish")."""
    language = pycountry.languages.get(alpha_2=code)
    if language is None:
        raise ValueError(f"{code!r} is no ISO 639-1 language code")
    return language.name.split(";")[0]


def country_translations(code: str, *, both_directions: bool = True) -> list[dict]:
    """Translation records of every country name the `code` catalogue translates."""
    catalogue = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[code])
    english, other = "English", language_name(code)
    records = []
    for country in pycountry.countries:
        translated = catalogue.gettext(country.name)
        if translated == country.name:
            continue
        records.append({"source_language": english, "target_language": other, "source": country.name,
                        "target": translated, "country": country.alpha_2})
        if both_directions:
            records.append({"source_language": other, "target_language": english, "source": translated,
                            "target": country.name, "country": country.alpha_2})
    return records


def write_records(output: str, *, languages: list[str] | tuple[str, ...] = LANGUAGES,
                  both_directions: bool = True) -> int:
    """Write the translation records of `languages` to the JSONL file `output`; returns their
    count. Also a recipe stage: `{kind: python, function: "examples.make_translation_data:write_records"}`."""
    records = [r for code in languages for r in country_translations(code.strip(), both_directions=both_directions)]
    Path(output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} translation records to {output}")
    return len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSONL file to write")
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated ISO 639-1 codes")
    parser.add_argument("--one-direction", action="store_true", help="English → other language only")
    args = parser.parse_args(argv)
    write_records(args.output, languages=args.languages.split(","), both_directions=not args.one_direction)


if __name__ == "__main__":
    main()
