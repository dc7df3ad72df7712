"""README.md and docs/*.md: every relative link points to a file that exists, and every #anchor to a heading
of that file. Anchors follow GitHub's rule: the heading in lower case, punctuation dropped, spaces turned into
hyphens, a repeated heading numbered -1, -2, ... Links inside code are ignored; http(s) links are not fetched."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(path: pathlib.Path):
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def broken_links(files) -> tuple[int, list[str]]:
    bad, count = [], 0
    for f in files:
        for n, line in prose_lines(f):
            line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                count += 1
                file_part, _, anchor = target.partition("#")
                dest = (f.parent / file_part).resolve() if file_part else f
                where = f"{f.name}:{n}: {target}"
                if not dest.exists():
                    bad.append(f"{where}: no such file")
                elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                    bad.append(f"{where}: no such anchor")
    return count, bad


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top Part\n[ok](a.md#top-part) [gone](b.md) [no](a.md#nowhere)\n"
                                   "```\n[in code](missing.md)\n```\n")
    count, bad = broken_links([tmp_path / "a.md"])
    assert count == 3 and [b.split(": ")[-1] for b in bad] == ["no such file", "no such anchor"]


def test_readme_and_docs_links_resolve():
    count, bad = broken_links([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert count > 50 and bad == []
