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


def test_error_names_where_the_bad_key_came_from(tmp_path):
    """A bad key given with --set is blamed on that --set, one in the file on the file."""
    f = tmp_path / "x.yaml"
    f.write_text("tiling:\n  overlap: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["tiling.foo=1"])
    msg = str(e.value)
    assert msg.startswith("--set tiling.foo=1: unknown key") and str(f) not in msg
    f.write_text("tiling:\n  foo: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["tiling.overlap=0.5"])
    assert str(e.value).startswith(f"{f}: tiling.foo: unknown key") and "--set" not in str(e.value)
    # A value from --set beats the file's: the --set is blamed; both errors in one line, each its origin.
    f.write_text("tiling:\n  overlap: 0.5\n  bar: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["model.id=keep", "tiling.overlap=2"])
    msg = str(e.value)
    assert f"{f}: tiling.bar: unknown key" in msg and "--set tiling.overlap=2: Input should be less than 1" in msg
    assert "model.id" not in msg and "\n" not in msg
    # A cross-key check of a section names every origin with keys in it.
    f.write_text("tiling:\n  patch_size: 449\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["tiling.overlap=0.5"])
    assert str(e.value).startswith(f"{f} + --set tiling.overlap=0.5: tiling: ") and "whole number" in str(e.value)
    # Without a file, a value set by a CLI flag (load_config's `extra`) is blamed on the options.
    with pytest.raises(ConfigError, match="^command-line options: tiling.magnification: "):
        load_config(None, ["tiling.overlap=0.5"], {"tiling": {"magnification": -1}})


def test_bad_set_key_through_the_cli(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("tiling:\n  overlap: 0.5\n")
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "config", str(f), "--set", "tiling.foo=1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: --set tiling.foo=1: unknown key") and str(f) not in p.stderr


def test_plausibility_keys():
    cfg = load_config()
    assert cfg.input.default_mpp is None and cfg.tiling.max_upsampling == 2.0
    assert cfg.tiling.max_tiles_per_slide == 500_000
    assert load_config(None, ["input.default_mpp=0.25"]).input.default_mpp == 0.25
    for bad in ("input.default_mpp=352.8", "input.default_mpp=0.01", "tiling.max_upsampling=0.5",
                "tiling.max_tiles_per_slide=0"):
        with pytest.raises(ConfigError, match=f"^--set {bad}: "):
            load_config(None, [bad])
    ref = subprocess.run([sys.executable, "-m", "zeus_ray", "config"], capture_output=True, text=True).stdout
    assert "default_mpp: None  # level-0 µm/px for slides whose metadata gives none or an implausible one" in ref
    assert "max_tiles_per_slide: 500000" in ref and "max_upsampling: 2.0" in ref


def test_on_off_switches_read_as_written(tmp_path):
    """YAML reads a bare on/off as a boolean; ray.fuse_read_encode takes it as the word it was."""
    assert load_config(None, ["ray.fuse_read_encode=off"]).ray.fuse_read_encode == "off"
    assert load_config(None, ["ray.fuse_read_encode=on"]).ray.fuse_read_encode == "on"
    f = tmp_path / "job.yaml"
    f.write_text("ray:\n  fuse_read_encode: off\n")
    assert load_config(str(f), []).ray.fuse_read_encode == "off"
