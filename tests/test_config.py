"""Configuration: defaults, TOML loading and one-line errors naming the key."""

import re
from dataclasses import replace

import pytest

from ldct_node.config import (
    AllowedPeer,
    Config,
    ConfigError,
    DeriveSettings,
    Destination,
    HttpSettings,
    InferenceSettings,
    LogSettings,
    QueueSettings,
    ReceiveSettings,
    SendSettings,
    StorageSettings,
    load_config,
    read_toml,
    validate,
)
from ldct_node.errors import CommandError


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


D = Destination("pacs", "PACS", "10.0.0.5", 104)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (Config(log=LogSettings(format="xml")), "config key 'log.format' must be one of auto, json, console, got 'xml'"),
        (Config(send=SendSettings(ae_title=" ")), "config key 'send.ae_title' must be 1-16 characters"),
        (Config(receive=ReceiveSettings(max_pending_per_address=0)), "config key 'receive.max_pending_per_address' must be at least 1"),
        (Config(receive=ReceiveSettings(max_pdu=1024)), "config key 'receive.max_pdu' must be 4096 to 67108864 bytes"),
        (Config(receive=ReceiveSettings(max_pdu=8192, max_instance_bytes=4096)),
         "config key 'receive.max_instance_bytes' must be at least receive.max_pdu"),
        (Config(receive=ReceiveSettings(acse_timeout_s=0.0)), "config key 'receive.acse_timeout_s' must be > 0 seconds"),
        (Config(receive=ReceiveSettings(min_free_bytes=-1)), "config key 'receive.min_free_bytes' must be >= 0"),
        (Config(receive=ReceiveSettings(allowed=(AllowedPeer("CT"), AllowedPeer("")))), "config key 'receive.allowed[1].ae_title' must be 1-16 characters"),
        (Config(send=SendSettings(destinations=(D, replace(D, name="b", port=0)))), "config key 'send.destinations[1].port' must be 1-65535"),
        (Config(send=SendSettings(destinations=(replace(D, ae_title=""),))), "config key 'send.destinations[0].ae_title' must be 1-16 characters"),
        (Config(send=SendSettings(destinations=(replace(D, name=" "),))), "config key 'send.destinations[0].name' must not be empty"),
        (Config(send=SendSettings(destinations=(D, D))), "config key 'send.destinations' must have unique names"),
        (Config(send=SendSettings(max_pdu=1024)), "config key 'send.max_pdu' must be 0 (unlimited) or >= 4096"),
        (Config(send=SendSettings(attempts=-1)), "config key 'send.attempts' must be 0 (no limit, only send.give_up_after_s) or more"),
        (Config(send=SendSettings(backoff_initial_s=0.0)), "config key 'send.backoff_initial_s' must be > 0"),
        (Config(send=SendSettings(backoff_max_s=1.0)), "config key 'send.backoff_max_s' must be >= send.backoff_initial_s"),
        (Config(send=SendSettings(give_up_after_s=0.0)), "config key 'send.give_up_after_s' must be > 0"),
        (Config(inference=InferenceSettings(chunk_slices=0)), "config key 'inference.chunk_slices' must be at least 1"),
        (Config(inference=InferenceSettings(threads=-1)), "config key 'inference.threads' must be 0 (default) or more"),
        (Config(derive=DeriveSettings(uid_root="1." * 17)),
         "config key 'derive.uid_root' must be a numeric UID prefix ending in '.', without leading zeros, at most 32 characters"),
        (Config(derive=DeriveSettings(institution_name="x" * 65)),
         "config key 'derive.institution_name' must be at most 64 characters and contain no backslash"),
        (Config(derive=DeriveSettings(transfer_syntax="1.2.840.10008.1.2.4.50")),
         "config key 'derive.transfer_syntax' must be explicit (1.2.840.10008.1.2.1) or implicit (1.2.840.10008.1.2) VR little endian"),
        (Config(queue=QueueSettings(quiet_period_s=-1.0)), "config key 'queue.quiet_period_s' must be >= 0"),
        (Config(queue=QueueSettings(poll_interval_s=0.0)), "config key 'queue.poll_interval_s' must be > 0"),
        (Config(queue=QueueSettings(stop_timeout_s=-1.0)), "config key 'queue.stop_timeout_s' must be >= 0"),
        (Config(storage=StorageSettings(keep_days=-1.0)), "config key 'storage.keep_days' must be >= 0"),
        (Config(storage=StorageSettings(disk_full_retry_s=0.0)), "config key 'storage.disk_full_retry_s' must be > 0"),
        (Config(http=HttpSettings(port=65536)), "config key 'http.port' must be 1-65535"),
    ],
)
def test_each_section_rule_is_the_one_line_error_naming_its_key(cfg, message):
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == message


def test_the_default_configuration_passes_every_section_check():
    validate(Config())


@pytest.mark.parametrize("error", [ConfigError, CommandError])
def test_toml_files_that_cannot_be_used_raise_the_callers_error_naming_the_file(tmp_path, error):
    (tmp_path / "bad.toml").write_text("[pair\n")
    (tmp_path / "good.toml").write_text("[[pair]]\npatient = 'P'\n")
    assert read_toml(tmp_path / "good.toml", "pairs file", error, not_found="x") == {"pair": [{"patient": "P"}]}
    cases = [(tmp_path / "missing.toml", "not found: check the path"), (tmp_path / "bad.toml", r"is not valid TOML \(.*\): fix the syntax"),
             (tmp_path, "cannot be read .*: check its permissions")]
    for path, text in cases:
        with pytest.raises(error, match=f"^pairs file {re.escape(str(path))} {text}$"):
            read_toml(path, "pairs file", error, not_found="check the path")
