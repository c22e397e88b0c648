"""``headshot-gateway upstream-check`` against the simulator over loopback: everything holds
when the simulator behaves as the gateway assumes, and each deviation the simulator can be
told to make is reported on its own line (judged on the JSON report's verdicts and data).

The simulator here is this module's own process: the tests change its key, secret and
auth mode, which the session's shared simulator must keep.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from app.upstream_check import CHECKS, RUN_CHECKS, Options, check_upstream
from tests.conftest import ROOT, SIM_DEFAULTS, SIM_KEY, SIM_SECRET, Sim, others_run
from tests.procs import bin_env, free_port, start_sim

FAST = {**SIM_DEFAULTS, "queue_s": 0.1, "run_s": 0.3, "api_key": SIM_KEY,
        "api_secret": SIM_SECRET}  # fmt: skip
FREE_CHECKS = [c for c in CHECKS if c not in RUN_CHECKS]
# The simulator's project holds only the check's own task, if any: no order to see.
ALL_HELD = {**dict.fromkeys(CHECKS, "held"), "task_list_order": "unknown"}


@pytest.fixture(scope="module")
def own_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = start_sim(
        tmp_path_factory.mktemp("usim") / "sim.log", api_key=SIM_KEY, api_secret=SIM_SECRET
    )
    yield sim
    sim.stop()


@pytest.fixture
def usim(own_sim: Sim) -> Sim:
    own_sim.reset(**FAST)
    return own_sim


def settings_for(sim: Sim, *, key: str = SIM_KEY, secret: str | None = SIM_SECRET,
                 public_url: str = "http://127.0.0.1:1") -> Settings:  # fmt: skip
    return Settings(env="test", wiro_base_url=sim.base, wiro_api_key=key,
                    wiro_api_secret=secret, public_url=public_url)  # fmt: skip


async def check(sim: Sim, *, run: bool, callback_wait_s: float = 5.0,
                **settings: Any) -> dict[str, Any]:  # fmt: skip
    port = free_port()
    options = Options(run=run, listen_host="127.0.0.1", listen_port=port, wait_s=20,
                      callback_wait_s=callback_wait_s, poll_s=0.05)  # fmt: skip
    report = await check_upstream(
        settings_for(sim, public_url=f"http://127.0.0.1:{port}", **settings), options
    )
    return report.to_json()


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {name: c["verdict"] for name, c in report["checks"].items()}


async def test_everything_holds_against_the_simulator(usim: Sim) -> None:
    report = await check(usim, run=True)
    assert verdicts(report) == ALL_HELD, report
    assert report["ok"] is True and report["configured_mode"] == "signature"
    checks = report["checks"]
    assert checks["stages"]["data"]["seen"][-1] == "task_postprocess_end"
    assert checks["callback"]["data"]["method"] == "POST"
    assert checks["callback_body"]["data"]["shape"] == "detail"
    assert checks["callback_body"]["data"]["names_task"] is True
    assert checks["nonce"]["data"]["replay_rejected"] is True
    assert checks["auth_mode"]["data"]["bare_key_accepted"] is False
    assert checks["output_download"]["data"]["format"] == "JPEG"
    stats = usim.stats()
    assert (stats["runs"], stats["upload_calls"], stats["delete_calls"]) == (1, 1, 2)


async def test_without_run_nothing_is_started(usim: Sim) -> None:
    report = await check(usim, run=False)
    v = verdicts(report)
    assert {n: v[n] for n in FREE_CHECKS} == {
        **dict.fromkeys(FREE_CHECKS, "held"),
        "task_list_callbackurl": "unknown",
        "task_list_order": "unknown",
    }  # no task yet
    assert {v[n] for n in RUN_CHECKS} == {"unknown"}
    assert report["ok"] is True and report["ran_task"] is False
    stats = usim.stats()
    assert (stats["run_calls"], stats["upload_calls"]) == (0, 0)


# knobs -> the checks expected to change (and to what); every other check must hold
DEVIATIONS = [
    ({"omit_pexit": True}, {"detail_pexit": "not_held"}),
    ({"task_list_callbackurl": False}, {"task_list_callbackurl": "not_held"}),
    ({"task_list_enabled": False},
     {"task_list": "not_held", "task_list_callbackurl": "unknown"}),
    ({"callback_body": "form"}, {"callback_body": "not_held"}),
    ({"callback_body": "empty"}, {"callback_body": "not_held"}),
    ({"callback_drop": 1.0}, {"callback": "unknown", "callback_body": "unknown"}),
    ({"fail_rate": 1.0}, {"detail_outputs": "not_held", "output_download": "unknown"}),
]  # fmt: skip


@pytest.mark.parametrize(("knobs", "expected"), DEVIATIONS,
                         ids=[next(iter(k)) + "=" + str(next(iter(k.values())))
                              for k, _ in DEVIATIONS])  # fmt: skip
async def test_each_deviation_is_reported_on_its_line(
    usim: Sim, knobs: dict[str, Any], expected: dict[str, str]
) -> None:
    usim.configure(**knobs)
    wait = 1.0 if knobs.get("callback_drop") else 5.0
    report = await check(usim, run=True, callback_wait_s=wait)
    assert verdicts(report) == {**ALL_HELD, **expected}, report
    assert report["ok"] is ("not_held" not in expected.values())
    data = {name: c["data"] for name, c in report["checks"].items()}
    if "omit_pexit" in knobs:
        assert data["detail_pexit"]["present"] is False
        assert data["detail_outputs"]["count"] == 1  # the outputs say it succeeded
    if knobs.get("callback_body") in ("form", "empty"):
        assert data["callback_body"]["shape"] == knobs["callback_body"]
        assert data["callback"]["method"] == "POST"
        if knobs["callback_body"] == "form":
            assert data["callback_body"]["content_type"] == "application/x-www-form-urlencoded"
            assert data["callback_body"]["names_task"] is True
    if "task_list_callbackurl" in knobs:
        assert data["task_list_callbackurl"]["found"] is True


async def test_project_not_enforcing_signatures(usim: Sim) -> None:
    usim.configure(sign_required=False)
    report = await check(usim, run=False)
    mode = report["checks"]["auth_mode"]
    assert mode["verdict"] == "held"
    assert (mode["data"]["bare_key_accepted"], mode["data"]["project"]) == (True, "key_accepted")
    assert verdicts(report)["auth"] == "held"


@pytest.mark.parametrize("ignores_order", [False, True])
async def test_task_list_order_is_checked(usim: Sim, ignores_order: bool) -> None:
    """With tasks on the project, Task/List's order is seen: numeric ids, descending, as
    asked (what lets the gateway's search end at an anchor), or not."""
    await others_run(usim, 3)
    usim.configure(task_list_ignores_order=ignores_order)
    report = await check(usim, run=False)
    order = report["checks"]["task_list_order"]
    assert order["verdict"] == ("not_held" if ignores_order else "held"), order
    assert report["ok"] is (not ignores_order)
    if ignores_order:
        first = [int(i) for i in order["data"]["first_ids"]]
        assert first == sorted(first) and len(first) == 3


async def test_key_only_configuration_against_a_signature_project(usim: Sim) -> None:
    report = await check(usim, run=False, secret=None)
    v = verdicts(report)
    assert report["configured_mode"] == "key_only"
    assert (v["auth"], v["auth_mode"], v["nonce"]) == ("not_held", "not_held", "unknown")
    assert report["checks"]["auth_mode"]["data"]["project"] == "signature"
    assert report["ok"] is False


async def test_key_only_configuration_against_a_key_only_project(usim: Sim) -> None:
    usim.configure(api_secret="")
    report = await check(usim, run=True, secret=None)
    v = verdicts(report)
    assert v == {**ALL_HELD, "nonce": "unknown"}, report
    assert report["checks"]["auth_mode"]["data"]["bare_key_accepted"] is True


async def test_wrong_secret_is_reported_as_auth(usim: Sim) -> None:
    report = await check(usim, run=True, secret="not-the-secret")
    v = verdicts(report)
    assert (v["reachable"], v["auth"], v["auth_mode"]) == ("held", "not_held", "held")
    assert report["checks"]["auth"]["data"]["probe"]["http_status"] == 401
    assert v["nonce"] == "unknown"
    assert {v[n] for n in RUN_CHECKS} == {"unknown"}  # nothing started with bad credentials
    assert usim.stats()["run_calls"] == 0 and report["ok"] is False


async def test_unreachable_upstream(usim: Sim) -> None:
    dead = Sim(url=f"http://127.0.0.1:{free_port()}", proc=usim.proc)
    report = await check(dead, run=True)
    assert verdicts(report)["reachable"] == "not_held"
    assert report["ok"] is False


def _cli(args: list[str], sim: Sim, *, secret: str = SIM_SECRET,
         public_url: str = "http://127.0.0.1:1") -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = bin_env(GATEWAY_WIRO_BASE_URL=sim.base, GATEWAY_WIRO_API_KEY=SIM_KEY,
                  GATEWAY_WIRO_API_SECRET=secret, GATEWAY_PUBLIC_URL=public_url,
                  GATEWAY_DATA_DIR=str(Path(ROOT) / "var"))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "app.cli", "upstream-check", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cli_run_needs_yes_and_prints_no_secret(usim: Sim) -> None:
    refused = _cli(["--run"], usim)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert usim.stats()["run_calls"] == 0

    port = free_port()
    done = _cli(
        [
            "--run",
            "--yes",
            "--json",
            "--listen",
            f"127.0.0.1:{port}",
            "--poll",
            "0.05",
            "--callback-wait",
            "5",
        ],
        usim,
        public_url=f"http://127.0.0.1:{port}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert verdicts(report) == ALL_HELD
    (task,) = httpx.get(f"{usim.url}/__sim/tasks", timeout=5).json()["tasks"]
    token = task["detail"]["socketaccesstoken"]
    callback_token = task["detail"]["callbackurl"].rsplit("/", 1)[1]
    for secret in (SIM_KEY, SIM_SECRET, token, callback_token):
        assert secret not in done.stdout + done.stderr

    table = _cli([], usim)
    assert table.returncode == 0 and "task_list_callbackurl" in table.stdout
    wrong = _cli(["--json"], usim, secret="wrong")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["checks"]["auth"]["verdict"] == "not_held"


async def test_no_billed_task_without_a_listener(usim: Sim) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = Options(run=True, listen_host="127.0.0.1", listen_port=port, wait_s=5,
                          callback_wait_s=1, poll_s=0.05)  # fmt: skip
        report = (await check_upstream(settings_for(usim), options)).to_json()
    v = verdicts(report)
    assert v["callback"] == "unknown" and v["run_answer"] == "unknown"
    assert report["checks"]["callback"]["detail"].endswith("no task was started")
    stats = usim.stats()
    assert (stats["run_calls"], stats["upload_calls"]) == (0, 0)
