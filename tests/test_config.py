"""Configuration: defaults, TOML loading and one-line errors naming the key."""

import pytest

from ldct_node.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_no_file_gives_the_embedded_default_on_loopback():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.receive.host == "127.0.0.1"
    assert cfg.receive.max_pdu > 16384


def test_values_from_file_override_defaults(tmp_path):
    cfg = load_config(write(tmp_path, '[receive]\nport = 4242\n[[send.destinations]]\nname="pacs"\nae_title="PACS"\nhost="10.0.0.5"\nport=104\n'))
    assert cfg.receive.port == 4242
    assert cfg.send.destinations[0].ae_title == "PACS"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[receive]\nprot = 1\n", "receive.prot"),
        ("[recieve]\nport = 1\n", "recieve"),
        ('[receive]\nport = "104"\n', "receive.port"),
        ("[receive]\nport = 70000\n", "receive.port"),
        ('[receive]\nae_title = "A_TITLE_THAT_IS_TOO_LONG"\n', "receive.ae_title"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[derive]\nuid_root = "1.2.abc."\n', "derive.uid_root"),
        ("[inference]\nbatch_size = 0\n", "inference.batch_size"),
        ('[inference]\ndevice = "cuda:x"\n', "inference.device"),
        ('[derive]\nuid_root = "1.02."\n', "derive.uid_root"),
        ('[derive]\nseries_description_suffix = " a\\\\b"\n', "derive.series_description_suffix"),
        ('[[send.destinations]]\nname = "p"\nae_title = "P"\nhost = ""\nport = 104\n', "send.destinations[0].host"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_toml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[receive\n"))


def test_unreadable_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a directory, as a wrong path often is
