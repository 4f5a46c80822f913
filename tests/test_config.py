"""The state dir: durable by default (the platform's state dir), overridable (no Ray)."""

from __future__ import annotations

from pathlib import Path

from actors.core.config import Config, default_state_dir


def test_the_default_state_dir_is_the_platforms():
    assert default_state_dir({"XDG_STATE_HOME": "/var/lib/me"}) == Path("/var/lib/me/rbee")
    home = Path.home() / ".local" / "state" / "rbee"
    assert default_state_dir({}) == home
    assert default_state_dir({"XDG_STATE_HOME": ""}) == home
    assert default_state_dir({"XDG_STATE_HOME": "relative/dir"}) == home  # the XDG spec: ignored


def test_state_dir_from_the_env_the_yaml_or_a_flag(tmp_path):
    assert Config().state_dir == default_state_dir({})
    assert Config.load(env={}).state_dir == default_state_dir({})
    xdg = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert Config.load(env=xdg).state_dir == tmp_path / "xdg" / "rbee"
    env = {**xdg, "RBEE_STATE_DIR": str(tmp_path / "env")}
    assert Config.load(env=env).state_dir == tmp_path / "env"

    yaml = tmp_path / "rbee.yaml"
    yaml.write_text(f"state_dir: {tmp_path / 'yaml'}\n")
    assert Config.load(yaml, env=xdg).state_dir == tmp_path / "yaml"
    assert Config.load(yaml, env=env).state_dir == tmp_path / "env"  # env beats the file
    assert Config.load(yaml, env=env, state_dir=tmp_path / "flag").state_dir == tmp_path / "flag"

    yaml.write_text("state_dir: ~/somewhere\n")
    assert Config.load(yaml, env={}).state_dir == Path.home() / "somewhere"
    yaml.write_text("state_dir: null\n")  # the way to keep no journal
    assert Config.load(yaml, env={}).state_dir is None
