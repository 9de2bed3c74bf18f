"""params.yaml is generated from conf/ and committed; it must not drift."""
import subprocess
import sys

from conftest import REPO


def test_params_yaml_is_up_to_date():
    proc = subprocess.run([sys.executable, "-m", "pipelines.compose_params", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
