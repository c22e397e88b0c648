"""What cannot run here must still read right: docs/operations.md names every setting,
and compose.yaml sets only settings that exist (pydantic-settings ignores unknown
``GATEWAY_`` variables, so a typo there would be silently dropped)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import Counter, Histogram

from app import metrics
from app.settings import Settings
from app.simulator import SimConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "operations.md").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_setting_is_documented() -> None:
    missing = [
        f"GATEWAY_{name.upper()}"
        for name in Settings.model_fields
        if f"`GATEWAY_{name.upper()}`" not in DOC
    ]
    assert missing == [], f"add to docs/operations.md: {missing}"


def test_every_metric_is_documented() -> None:
    documented = set(re.findall(r"`(gateway_[a-z_]+)`", DOC))
    families = [
        family
        for obj in vars(metrics).values()
        if isinstance(obj, Counter | Histogram)
        for family in obj.describe()
    ]
    assert len(families) >= 10
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert name in documented, name
    text = metrics.render(metrics.DbSnapshot({"pending": 2}, None), ["pending"]).decode()
    gauges = set(re.findall(r"^# TYPE (gateway_\S+) gauge$", text, re.M))
    assert len(gauges) == 5 and gauges <= documented


def test_compose_sets_real_settings_and_a_long_enough_stop_grace() -> None:
    services = COMPOSE["services"]
    replicas = [s for name, s in services.items() if name.startswith("gateway-")]
    assert len(replicas) == 2
    urls = set()
    for svc in replicas:
        env = svc["environment"]
        unknown = [
            k
            for k in env
            if k.startswith("GATEWAY_")
            and k.removeprefix("GATEWAY_").lower() not in Settings.model_fields
        ]
        assert unknown == []
        settings = Settings(**{k.removeprefix("GATEWAY_").lower(): v for k, v in env.items()})
        assert settings.is_postgres and settings.admin_client_names == {"ops"}
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace >= settings.shutdown_grace_s + 5
        urls.add(settings.public_url)
        sim = services["wiro-sim"]["environment"]
        assert settings.wiro_base_url == f"{sim['SIM_PUBLIC_URL']}/v1"
        assert settings.wiro_api_key.get_secret_value() == sim["SIM_API_KEY"]
    assert len(urls) == 2  # each replica advertises where the simulator reaches it
    sim_env = services["wiro-sim"]["environment"]
    assert {k.removeprefix("SIM_").lower() for k in sim_env} <= set(SimConfig.model_fields)
