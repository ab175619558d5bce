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


def test_speed_section_runs_from_an_installed_package(tmp_path):
    """Only the package, as pip installs it: no benchmarks/ beside it, so the section must time in-process."""
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site"
    shutil.copytree(pathlib.Path(tour.__file__).parent, site / "jaxseq", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import pathlib, sys\nfrom jaxseq import tour\nprint(tour.__file__)\n"
              "cfg = tour.TourConfig.quick(pathlib.Path(sys.argv[1]))\ncfg.out.mkdir()\nprint(tour.speed(cfg, cfg.out))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site / "jaxseq")), done.stdout
    assert '| jaxseq impl="scan" |' in done.stdout and "Peers installed:" in done.stdout
