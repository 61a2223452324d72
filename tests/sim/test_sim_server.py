"""Result URL expiry, pruning, operator access, config loading, and the ways to run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from sim_helpers import KEY, Client, fast_config

from pipeline.contract import KLEIN_PATH, RESULT_URL_TTL_S
from pipeline.errors import ConfigError
from pipeline.sim import LatencyConfig, SimConfig, SimServer, create_app
from pipeline.sim.responses import is_loopback, is_loopback_host
from pipeline.sim.server import SIM_KEY, _stats

REPO = Path(__file__).resolve().parents[2]
DEMO_TOML = REPO / "pipeline" / "sim" / "demo.toml"
T0 = 1_800_000_000.0


async def test_result_urls_expire_and_cannot_be_forged() -> None:
    now = [T0]
    config = SimConfig(latency=LatencyConfig(median_s=1.0, p95_s=1.0), result_ttl_s=30.0)
    async with SimServer(config, clock=lambda: now[0]) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(seed=1)
        now[0] += 1.0
        url = (await (await client.poll(task_id)).json())["data"]["generated"][0]
        assert "expires=" in url
        now[0] = T0 + 1.0 + 29.0
        assert (await client.download(url))[0] == 200
        forged = url.replace(f"expires={int(T0 + 31)}", f"expires={int(T0 + 9999)}")
        assert forged != url
        status, body, _ = await client.download(forged)
        assert status == 403
        assert "signature" in json.loads(body)["message"]
        now[0] = T0 + 1.0 + 30.0
        status, body, resp = await client.download(url)
        assert status == 403
        assert resp.headers["Content-Type"].startswith("application/json")
        assert "expired" in json.loads(body)["message"]
        stats = server.stats()["keys"]["demo"]
        assert (stats["downloads"], stats["downloads_expired"]) == (1, 1)


async def test_result_url_uses_the_host_the_client_used() -> None:
    async with SimServer(fast_config()) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(seed=1)
        data = await client.wait(task_id)
        assert data["generated"][0].startswith(f"http://127.0.0.1:{server.port}/")
        async with s.get(
            f"{server.url}{KLEIN_PATH}/{task_id}",
            headers={**client.headers, "Host": f"localhost:{server.port}"},
        ) as resp:
            url = (await resp.json())["data"]["generated"][0]
        assert url.startswith(f"http://localhost:{server.port}/_sim/results/")
        assert (await client.download(url))[0] == 200


async def test_finished_tasks_are_pruned_after_retention() -> None:
    now = [T0]
    config = SimConfig(
        latency=LatencyConfig(median_s=1.0, p95_s=1.0), result_ttl_s=10.0, retention_s=5.0
    )
    async with SimServer(config, clock=lambda: now[0]) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(seed=1)
        state = server.sim.state
        now[0] = T0 + 1.0 + 14.0
        assert state.prune(now[0]) == 0
        assert (await client.poll(task_id)).status == 200
        now[0] = T0 + 1.0 + 15.0
        assert state.prune(now[0]) == 1
        assert (await client.poll(task_id)).status == 404
        assert server.stats()["keys"]["demo"]["tasks_retained"] == 0
        assert state.references == {}


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.5", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_loopback_check(peer: str | None, allowed: bool) -> None:
    assert is_loopback(peer) is allowed


def test_webhook_host_check() -> None:
    assert is_loopback_host("localhost")
    assert is_loopback_host("[::1]")
    assert is_loopback_host("127.0.0.1")
    assert not is_loopback_host("example.com")
    assert not is_loopback_host("10.1.2.3")


async def test_operator_endpoint_refuses_remote_peer() -> None:
    app = create_app(fast_config())
    for peer, status in (("203.0.113.9", 403), ("127.0.0.1", 200)):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None, p=peer: (
            (p, 4321) if name == "peername" else default
        )
        request = make_mocked_request("GET", "/_sim/stats", app=app, transport=transport)
        resp = await _stats(request)
        assert resp.status == status
    assert app[SIM_KEY].state.stats()["totals"]["polls"] == 0


def test_in_thread_serves_sync_callers() -> None:
    with SimServer.in_thread(fast_config()) as server:
        request = urllib.request.Request(
            server.url + KLEIN_PATH,
            data=json.dumps({"prompt": "sync", "seed": 1}).encode(),
            headers={"x-freepik-api-key": KEY, "content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["data"]["status"] == "CREATED"
        with urllib.request.urlopen(server.url + "/_sim/stats", timeout=10) as resp:
            assert json.load(resp)["totals"]["submits_accepted"] == 1
        assert server.stats()["keys"]["demo"]["submits_accepted"] == 1
        server.reset()
        assert server.stats()["keys"]["demo"]["submits_accepted"] == 0
        url = server.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/_sim/stats", timeout=2)


def test_command_line_prints_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sim", "--config", str(DEMO_TOML), "--port", "0",
         "--seed", "3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("klein simulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        with urllib.request.urlopen(url + "/_sim/stats", timeout=10) as resp:
            stats = json.load(resp)
        assert set(stats["keys"]) == {"demo", "trial"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[keys]]\nname = "x"\nkey = "super-secret-value"\ntier = "gold"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.sim", "--config", str(bad), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "keys[0].tier" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "super-secret-value" not in proc.stderr


def test_demo_toml_loads_and_defaults_match_the_brief() -> None:
    demo = SimConfig.from_toml(DEMO_TOML)
    assert [k.name for k in demo.keys] == ["demo", "trial"]
    assert demo.key_tier(demo.keys[1]).max_active == 2
    default = SimConfig()
    assert [(k.name, k.key, k.tier, k.credits) for k in default.keys] == [
        ("demo", "sim-demo-key", "standard", None)
    ]
    assert (default.latency.median_s, default.latency.p95_s) == (1.0, 2.5)
    assert default.result_ttl_s == RESULT_URL_TTL_S


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour = 1", "colour"),
        ("[latency]\nmedian = 1.0", "latency.median"),
        ('[latency]\nmedian_s = "fast"', "latency.median_s"),
        ("[latency]\nmedian_s = 2.0\np95_s = 1.0", "latency.p95_s"),
        ("[faults.poll]\nerror_503 = 1.5", "faults.poll.error_503"),
        ("[faults]\ntruncate = -0.1", "faults.truncate"),
        ('retry_after = "later"', "retry_after"),
        ("keys = []", "keys"),
        ('[[keys]]\nname = "a"\nkey = "k"\ntier = "platinum"', "keys[0].tier"),
        ('[[keys]]\nname = "a"\nkey = "k"\nmax_active = 0', "keys[0].max_active"),
        ('[[keys]]\nname = "a"\nkey = "k"\n[[keys]]\nname = "a"\nkey = "j"', "keys[1].name"),
        ("[tiers.x]\nmax_active = 0", "tiers.x.max_active"),
        ("[moderation]\nwords = 'nude'", "moderation.words"),
        ("result_ttl_s = 0", "result_ttl_s"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_config_errors_name_the_setting(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        SimConfig.from_toml(path)
    assert named in str(info.value)
    assert str(path) in str(info.value)


def test_config_missing_file_and_secret_values_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        SimConfig.from_toml(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        SimConfig.from_dict({"keys": [{"name": "a", "key": 12345678}]})
    assert "12345678" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        SimConfig.from_dict(
            {"keys": [{"name": "a", "key": "dup-val"}, {"name": "b", "key": "dup-val"}]}
        )
    assert "dup-val" not in str(info.value)


def test_from_dict_builds_tiers_and_keys() -> None:
    config = SimConfig.from_dict(
        {
            "tiers": {"trial": {"max_active": 3, "submits_per_minute": 30}},
            "keys": [{"name": "a", "key": "ka", "tier": "trial", "credits": 5}],
            "faults": {"seed": 9, "download": {"error_503": 0.5}},
        }
    )
    assert config.key_tier(config.keys[0]).max_active == 3
    assert config.keys[0].credits == 5.0
    assert config.faults.download.error_503 == 0.5
    assert config.faults.poll.error_503 == 0.0
