"""`jaxseq tour --quick` end to end: every chapter runs on embedded data and the report has every section."""
from jaxseq import cli, tour


def test_quick_tour_writes_every_section(tmp_path, capsys):
    code = cli.main(["tour", "--quick", "--out", str(tmp_path / "tour")])
    report = (tmp_path / "tour" / "README.md").read_text()
    summary = capsys.readouterr().out
    for number, (slug, title, _) in enumerate(tour.SECTIONS, 1):
        assert f"## {number}. {title}" in report
        assert f"{slug:<10} ok" in summary, summary
    assert "**Failed**" not in report
    assert code == 0
    # Figures the report links to exist.
    for image in ("gradients/rnn/gradnorms.png", "forecast/forecast.png", "translate/attention.png"):
        assert (tmp_path / "tour" / image).is_file(), image
    assert "| persistence |" in report and "| additive |" in report
