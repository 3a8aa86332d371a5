"""benchmarks.pages: the results pages' cost sections follow the committed benchmark tables."""

from __future__ import annotations

from benchmarks import pages


def test_rewrite_replaces_the_section_to_the_end_and_appends_when_missing():
    page = "# Page\n\nabove\n\n## Cost\n\nold table\n## a subsection of the table\nold\n"
    assert pages.rewrite(page, "## Cost", ["## Cost", "", "new"], "\n") == "# Page\n\nabove\n\n## Cost\n\nnew\n"
    assert pages.rewrite("# Page\nabove", "## Cost", ["## Cost", "new"], "") == "# Page\nabove\n\n## Cost\nnew"


def test_the_committed_pages_show_the_committed_benchmark_tables(tmp_path, capsys):
    """``python -m benchmarks.pages --check`` on the repository: a new benchmark table committed without its pages
    (or a page edited by hand below its cost heading) fails here."""
    assert pages.main(["--check"]) == 0, capsys.readouterr().out
    (tmp_path / "vision.md").write_text("# Vision results\n\nthe accuracy part\n")
    for name in ("pointcloud.md", "tracking.md", "tracking_240_steps.md"):
        (tmp_path / name).write_text((pages.ROOT / "docs" / "results" / name).read_text())
    assert pages.main(["--check", "--results-dir", str(tmp_path)]) == 1
    assert pages.main(["--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "vision.md").read_text()
    assert text.startswith("# Vision results\n\nthe accuracy part\n\n## Cost on ViT-B/16")
    assert pages.main(["--check", "--results-dir", str(tmp_path)]) == 0
