"""Config validation: bad keys, types and impossible values fail before any work, naming the key."""
import subprocess
import sys

import pytest

from zeus_ray.config import load_config, parse_overrides
from zeus_ray.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.tiling.patch_size == 448 and cfg.tiling.stride == 112 and cfg.tiling.mpp == 1.0


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tiling:\n  overlap: 0.5\nmodel:\n  id: keep\n")
    cfg = load_config(f, ["tiling.patch_size=224", "model.id=plip"])
    assert cfg.tiling.overlap == 0.5 and cfg.tiling.stride == 112 and cfg.model.id == "plip"


@pytest.mark.parametrize("text,key", [
    ("tiling:\n  overlapp: 0.5\n", "tiling.overlapp"),
    ("tiling:\n  overlap: 1.0\n", "tiling.overlap"),
    ("tiling:\n  patch_size: 0\n", "tiling.patch_size"),
    ("tiling:\n  patch_size: big\n", "tiling.patch_size"),
    ("tissue:\n  saturation_threshold: 300\n", "tissue.saturation_threshold"),
    ("bogus: {}\n", "bogus"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_fractional_stride_rejected():
    with pytest.raises(ConfigError, match="whole number"):
        load_config(None, ["tiling.overlap=0.7"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["tiling.overlap"])
    with pytest.raises(ConfigError, match="tiling.overlap"):
        load_config(None, ["tiling.overlap=2"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_one_line_without_traceback(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tiling:\n  overlap: 1.5\n")
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "config", str(f)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "tiling.overlap" in p.stderr and "Traceback" not in p.stderr
    ok = subprocess.run([sys.executable, "-m", "zeus_ray", "config"], capture_output=True, text=True)
    assert ok.returncode == 0 and "patch_size: 448" in ok.stdout
