"""The broker URL: the forms CALLQ_BROKER takes for the Rust processes."""

from __future__ import annotations

import pytest

from callq_client import ConfigError
from callq_client.url import DEFAULT_URL, AmqpConfig, KafkaConfig, parse, redact


def test_amqp_one_node() -> None:
    cfg = parse("amqp://app:secret@rabbit:5673/prod?heartbeat=5")
    assert isinstance(cfg, AmqpConfig)
    assert cfg.user == "app" and cfg.vhost == "prod" and not cfg.tls
    assert [(n.host, n.port) for n in cfg.nodes] == [("rabbit", 5673)]
    assert cfg.nodes[0].url == "amqp://app:secret@rabbit:5673/prod?heartbeat=5"


def test_amqp_several_nodes_in_both_forms() -> None:
    one = parse("amqp://u:p@h1:5681,h2:5682,h3/%2f")
    assert isinstance(one, AmqpConfig)
    assert [(n.host, n.port) for n in one.nodes] == [("h1", 5681), ("h2", 5682), ("h3", 5672)]
    assert one.vhost == "/"
    whole = parse("amqp://u:p@h1:5681/v,amqp://u:p@h2:5682/v")
    assert isinstance(whole, AmqpConfig)
    assert [n.port for n in whole.nodes] == [5681, 5682] and whole.vhost == "v"
    with pytest.raises(ConfigError, match="differ in user or virtual host"):
        parse("amqp://u:p@h1/v1,amqp://u:p@h2/v2")


def test_amqps_takes_the_tls_files_out_of_the_url() -> None:
    cfg = parse("amqps://u:p@h/v?cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem&heartbeat=5")
    assert isinstance(cfg, AmqpConfig)
    assert cfg.tls and cfg.nodes[0].port == 5671
    assert (cfg.cacertfile, cfg.certfile, cfg.keyfile) == ("/ca.pem", "/c.pem", "/k.pem")
    assert "cacertfile" not in cfg.nodes[0].url and "heartbeat=5" in cfg.nodes[0].url
    with pytest.raises(ConfigError, match="go together"):
        parse("amqps://u:p@h/v?certfile=/c.pem")
    with pytest.raises(ConfigError, match="amqps"):
        parse("amqp://u:p@h/v?cacertfile=/ca.pem")


def test_kafka_keys_of_the_adapter_and_of_librdkafka() -> None:
    cfg = parse(
        "kafka://a:9092,b:9092?partitions=4&topic_prefix=t1.&group_prefix=g1.&fetch_wait_ms=10"
        "&session_timeout_ms=2000&timeout_ms=5000&confirm_timeout_ms=7000&ssl.key.location=/k"
    )
    assert isinstance(cfg, KafkaConfig)
    assert cfg.bootstrap == "a:9092,b:9092" and not cfg.tls
    assert (cfg.partitions, cfg.topic_prefix, cfg.group_prefix, cfg.fetch_wait_ms) == (4, "t1.", "g1.", 10)
    assert (cfg.timeout_s, cfg.confirm_timeout_s) == (5.0, 7.0)
    assert cfg.librdkafka == {"ssl.key.location": "/k"}
    tls = parse("kafkas://a:9093")
    assert isinstance(tls, KafkaConfig) and tls.tls
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        parse("kafka://a:1?colour=blue")
    with pytest.raises(ConfigError, match="partitions"):
        parse("kafka://a:1?partitions=0")
    with pytest.raises(ConfigError, match="not a Kafka URL"):
        parse("kafka://user@a:1")


def test_an_unsupported_scheme_says_which_are() -> None:
    for bad in ("http://x", "redis://x:6379", "rabbit", "nats://x"):
        with pytest.raises(ConfigError, match="amqp:// and amqps://.*kafka:// and kafkas://"):
            parse(bad)


def test_the_default_is_callq_broker_else_local_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLQ_BROKER", raising=False)
    cfg = parse()
    assert isinstance(cfg, AmqpConfig) and cfg.nodes[0].url.startswith("amqp://guest:guest@127.0.0.1:5672/")
    assert DEFAULT_URL.startswith("amqp://")
    monkeypatch.setenv("CALLQ_BROKER", "kafka://k:9092")
    assert isinstance(parse(), KafkaConfig)


def test_passwords_stay_out_of_messages() -> None:
    assert "secret" not in redact("amqp://u:secret@h1:1/v,amqp://u:secret@h2:2/v")
    with pytest.raises(ConfigError) as info:
        parse("amqp://u:secret@h1/v1,amqp://u:secret@h2/v2")
    assert "secret" not in str(info.value)
