import subprocess
import sys

from vlmkit.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out


def test_info_reports_missing_directory_without_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "config.json not found" in err and "Traceback" not in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "vlmkit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: vlmkit" in out.stdout
