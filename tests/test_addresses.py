"""A worker given by its own address (distributed_core/config.py, client.py, fleet.py) on plain
values: what the config accepts and refuses, header values hidden wherever the config is shown,
TLS failures in words, and the clients that carry a worker's CA and headers. The same run on real
servers behind a TLS proxy in test_e2e_tls.py."""
from __future__ import annotations

import ssl
import types

import aiohttp
import pytest

from distributed_core import client as client_module
from distributed_core import config as config_file
from distributed_core.fleet import Fleet


def parse_worker(**fields) -> config_file.Worker:
    return config_file.parse({"workers": [{"id": "pod", **fields}]}).workers[0]


def refusal(**fields) -> str:
    with pytest.raises(config_file.ConfigError) as info:
        parse_worker(**fields)
    return str(info.value)


def test_a_url_stands_for_host_and_port_and_keeps_its_path_prefix():
    pod = parse_worker(url="https://pod-8188.proxy.example.net/comfy/")
    assert pod.url == "https://pod-8188.proxy.example.net/comfy"
    assert (pod.host, pod.port, pod.is_local, pod.on_this_machine) == ("pod-8188.proxy.example.net", 443, False, False)
    local_proxy = parse_worker(url="https://127.0.0.1:8443")
    assert local_proxy.port == 8443 and local_proxy.on_this_machine and not local_proxy.is_local  # never launched
    assert parse_worker(url="http://10.0.0.5").port == 80
    plain = parse_worker(port=8190)
    assert plain.url == "http://127.0.0.1:8190" and plain.is_local


@pytest.mark.parametrize("fields,words", [
    ({"url": "ftp://host"}, "http:// or https://"),
    ({"url": "https://user:pw@host"}, "user name or password"),
    ({"url": "https://host/?token=1"}, "query or fragment"),
    ({"url": "https://host:notaport"}, "http:// or https://"),
    ({"url": "https://host", "port": 8189}, "not both"),
    ({"headers": {"Host": "x"}}, "not a header name"),
    ({"headers": {"X-Token": "a\r\nInjected: 1"}}, "on one line"),
    ({"headers": ["X-Token: a"]}, "must be an object"),
])
def test_bad_addresses_and_headers_are_refused_with_the_field_named(fields, words):
    message = refusal(**fields)
    assert words in message and "workers[0]." in message


def test_the_config_as_shown_hides_header_values_and_saving_it_back_keeps_them():
    config = config_file.parse({"workers": [{"id": "pod", "url": "https://pod.example.net",
                                             "headers": {"Authorization": "Bearer abc", "X-Other": "o"}}]})
    shown = config_file.public_dict(config)
    assert shown["workers"][0]["headers"] == {"Authorization": config_file.HIDDEN, "X-Other": config_file.HIDDEN}
    assert "Bearer abc" not in repr(shown)
    shown["workers"][0]["headers"]["X-Other"] = "new"  # one changed, one left as shown
    again = config_file.parse(config_file.keep_hidden(shown, config))
    assert again.workers[0].headers == {"Authorization": "Bearer abc", "X-Other": "new"}
    assert config_file.parse(config.to_dict()).workers[0] == config.workers[0]  # the file keeps them in clear


def test_a_hidden_value_for_a_header_that_was_never_set_is_dropped():
    config = config_file.parse({"workers": [{"id": "pod", "url": "https://pod.example.net"}]})
    posted = {"workers": [{"id": "pod", "url": "https://pod.example.net", "headers": {"X-New": config_file.HIDDEN}}]}
    assert config_file.parse(config_file.keep_hidden(posted, config)).workers[0].headers == {}


def certificate_error(message: str) -> aiohttp.ClientConnectorCertificateError:
    error = ssl.SSLCertVerificationError(1, message)
    error.verify_message = message
    return aiohttp.ClientConnectorCertificateError(types.SimpleNamespace(host="pod", port=443, ssl=True), error)


@pytest.mark.parametrize("message,words", [
    ("Hostname mismatch, certificate is not valid for 'pod'.", "another host name"),
    ("certificate has expired", "expired; renew"),
    ("self-signed certificate in certificate chain", "ca_bundle"),
    ("unable to get local issuer certificate", "ca_bundle"),
])
def test_tls_failures_are_told_in_words_with_the_remedy(message, words):
    described = client_module.describe("https://pod/comfy", certificate_error(message))
    assert described.startswith("https://pod/comfy: its https certificate was not accepted") and words in described


class Recorder:
    """An aiohttp session that records what each request carried."""

    def __init__(self):
        self.calls = []

    def request(self, method, url, **kwargs):
        self.calls.append((method, url, kwargs))
        raise aiohttp.ClientConnectionError("recorded")

    closed = False


def test_the_fleets_client_of_a_worker_carries_its_ca_and_headers_and_no_other_does(tmp_path):
    import asyncio
    config = config_file.parse({"master": {"port": 18188}, "workers": [
        {"id": "pod", "url": "https://pod.example.net/comfy", "headers": {"X-Token": "t"}},
        {"id": "bad", "url": "https://bad.example.net", "ca_bundle": str(tmp_path / "missing.pem")},
        {"id": "plain", "port": 18189}]})
    fleet = Fleet(lambda: config_file.Loaded(config, tmp_path / "c.json"), lambda: ("127.0.0.1", 18188))
    recorder = Recorder()
    fleet.session = lambda: recorder
    pod = fleet.client("https://pod.example.net/comfy")
    assert pod.headers == {"X-Token": "t"} and pod.tls is None
    assert fleet.client("http://127.0.0.1:18189").headers == {}
    with pytest.raises(client_module.InstanceError):
        asyncio.run(pod.queue_remaining())
    method, url, kwargs = recorder.calls[-1]
    assert url == "https://pod.example.net/comfy/prompt" and kwargs["headers"] == {"X-Token": "t"}
    with pytest.raises(client_module.InstanceError) as info:  # a CA file that is not there: why, at once
        asyncio.run(fleet.client("https://bad.example.net").queue_remaining())
    assert "ca_bundle" in str(info.value) and "missing.pem" in str(info.value)
