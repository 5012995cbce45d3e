"""Pool assignment when a HIS publishes capacity (R20, R21): rounding, spread over the day,
a whole day in one transaction Bundle, per-department policy, the visible and searchable tag,
and the policy file and admin API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.capacity.policy import PolicyError, load_policy_file
from service.capacity.pools import reserved_count, spread
from service.capacity.tables import POLICIES
from tests.test_capacity_support import (  # noqa: F401  (fixtures)
    CARDIOLOGY,
    DAY,
    ENDOCRINOLOGY,
    HOSPITAL,
    capacity_app,
    clock,
    http,
    pools,
    publish_day,
    store,
    tag_pool,
    unit,
)

ADMIN = "http://testserver/admin/capacity"


@pytest.fixture(autouse=True)
def no_policy_overrides(engine: sa.Engine) -> None:
    """Each test starts from the file defaults."""
    with engine.begin() as conn:
        conn.execute(POLICIES.delete())


# -- the arithmetic ------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "share", "reserved"), [
    (10, 0.25, 3),  # ceil(2.5)
    (20, 0.25, 5),
    (4, 0.25, 1),
    (1, 0.25, 1),  # at least one whenever the share is above 0
    (2, 0.01, 1),
    (9, 1 / 3, 3),  # R21 outpatient share, no float drift
    (30, 0.1, 3),  # 30 × 0.1 is 3.0000000000000004 in floats; still 3
    (10, 0.0, 0),
    (0, 0.25, 0),
    (5, 1.0, 5),
])
def test_r20_reserved_count_is_ceil_of_share_and_at_least_one(n: int, share: float, reserved: int) -> None:
    assert reserved_count(n, share) == reserved
    assert sum(spread(n, share)) == reserved


def test_r20_reserved_slots_are_spread_over_the_day_not_bunched_at_the_start() -> None:
    assert [i for i, r in enumerate(spread(10, 0.25)) if r] == [0, 4, 8]
    reserved = [i for i, r in enumerate(spread(40, 0.25)) if r]
    assert reserved == list(range(0, 40, 4))
    afternoon = [i for i in reserved if i >= 20]
    assert len(afternoon) == 5  # half of the day's reserved slots are in its second half


def test_r20_spread_is_prefix_stable_so_publishing_in_time_order_never_moves_a_slot() -> None:
    for n in range(1, 30):
        assert spread(n, 0.25) == spread(30, 0.25)[:n]


# -- publishing ----------------------------------------------------------------------------------

async def test_r20_a_day_published_in_one_transaction_bundle_reserves_25_percent(http, engine) -> None:
    _, slots = await publish_day(http, 10)
    assert pools(engine, slots) == ["reserved", "general", "general", "general", "reserved",
                                    "general", "general", "general", "reserved", "general"]
    first = (await http.get(f"/Slot/{slots[0]}")).json()
    assert tag_pool(first) == "reserved" and first["meta"]["versionId"] == "1"  # tagged once, not rewritten


async def test_r20_bundle_in_random_order_still_reserves_the_right_count_spread_by_time(http, engine) -> None:
    order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]
    _, slots = await publish_day(http, 10, order=order)
    assert pools(engine, slots) == ["reserved", "general", "general", "general", "reserved",
                                    "general", "general", "general", "reserved", "general"]
    for slot_id, pool in zip(slots, pools(engine, slots), strict=True):
        assert tag_pool((await http.get(f"/Slot/{slot_id}")).json()) == pool  # tag and table agree


async def test_r20_slots_posted_before_their_schedule_in_the_bundle_get_the_schedules_policy(http, engine) -> None:
    """FHIR processes POST before PUT: with PUT Schedule last, the slots come first."""
    await http.put(f"{ADMIN}/policy/{CARDIOLOGY}", json={"specialist_reserved_share": "1/2"})
    _, slots = await publish_day(http, 10, schedule_first=False)
    assert pools(engine, slots).count("reserved") == 5
    row = unit(engine, f"Slot/{slots[0]}")
    assert row["organization"] == HOSPITAL and row["department"] == CARDIOLOGY and row["share"] == 0.5


async def test_r20_slots_published_one_by_one_keep_the_share_per_schedule_day(http, engine) -> None:
    from tests.test_capacity_support import schedule_resource, slot_times

    schedule_id = "sch-one-by-one"
    assert (await http.put(f"/Schedule/{schedule_id}", json=schedule_resource(schedule_id))).status_code in (200, 201)
    ids = []
    for i, (start, end) in enumerate(slot_times(DAY, 8)):
        slot = {"resourceType": "Slot", "id": f"{schedule_id}-{i}", "schedule": {"reference": f"Schedule/{schedule_id}"},
                "status": "free", "start": start.isoformat(), "end": end.isoformat()}
        assert (await http.put(f"/Slot/{slot['id']}", json=slot)).status_code in (200, 201)
        ids.append(slot["id"])
    assert pools(engine, ids) == ["reserved", "general", "general", "general", "reserved", "general", "general",
                                  "general"]


async def test_r20_a_slot_inserted_earlier_rebalances_free_slots_with_a_new_tagged_version(http, engine) -> None:
    schedule_id, slots = await publish_day(http, 4)  # 8:00-9:00, one reserved: the first
    assert pools(engine, slots) == ["reserved", "general", "general", "general"]
    early = {"resourceType": "Slot", "id": f"{schedule_id}-early", "schedule": {"reference": f"Schedule/{schedule_id}"},
             "status": "free", "start": "2026-03-03T07:45:00+08:00", "end": "2026-03-03T08:00:00+08:00"}
    assert (await http.put(f"/Slot/{early['id']}", json=early)).status_code == 201
    everything = [early["id"], *slots]
    assert pools(engine, everything).count("reserved") == 2  # ceil(5 × 0.25)
    assert pools(engine, everything)[0] == "reserved"
    for slot_id, pool in zip(everything, pools(engine, everything), strict=True):
        assert tag_pool((await http.get(f"/Slot/{slot_id}")).json()) == pool


async def test_r20_a_his_cannot_choose_the_pool_the_tag_is_always_ours(http, engine) -> None:
    _, slots = await publish_day(http, 4)
    general = slots[1]
    slot = (await http.get(f"/Slot/{general}")).json()
    slot["meta"]["tag"] = [{"system": "https://yilian.example.org/fhir/CodeSystem/capacity-pool", "code": "reserved"}]
    updated = (await http.put(f"/Slot/{general}", json=slot)).json()
    assert tag_pool(updated) == "general"
    assert pools(engine, slots) == ["reserved", "general", "general", "general"]


async def test_r20_per_department_override_applies_to_that_department_only(http, engine) -> None:
    response = await http.put(f"{ADMIN}/policy/{ENDOCRINOLOGY}", json={"specialist_reserved_share": 0.5})
    assert response.status_code == 200, response.text
    _, endo = await publish_day(http, 10, actor="PractitionerRole/spec-yq1-endocrinology-1")
    _, cardio = await publish_day(http, 10)
    assert pools(engine, endo).count("reserved") == 5
    assert pools(engine, cardio).count("reserved") == 3


async def test_r20_hospital_override_and_department_override_most_specific_wins(http, engine) -> None:
    await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"specialist_reserved_share": 0.2})
    await http.put(f"{ADMIN}/policy/{ENDOCRINOLOGY}", json={"specialist_reserved_share": 0.3})
    _, cardio = await publish_day(http, 10)
    _, endo = await publish_day(http, 10, actor="PractitionerRole/spec-yq1-endocrinology-1")
    assert pools(engine, cardio).count("reserved") == 2
    assert pools(engine, endo).count("reserved") == 3


async def test_r20_policy_change_applies_to_capacity_published_after_it(http, engine) -> None:
    _, before = await publish_day(http, 10)
    await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"specialist_reserved_share": 0.3})
    _, after = await publish_day(http, 10)
    assert pools(engine, before).count("reserved") == 3  # unchanged
    assert pools(engine, after).count("reserved") == 3  # ceil(3.0)
    await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"specialist_reserved_share": 0.2})
    _, later = await publish_day(http, 10)
    assert pools(engine, later).count("reserved") == 2
    assert pools(engine, before).count("reserved") == 3


async def test_r21_outpatient_schedules_reserve_one_third(http, engine) -> None:
    _, slots = await publish_day(http, 9, kind="outpatient")
    assert pools(engine, slots).count("reserved") == 3


async def test_r20_pool_is_searchable_with_the_pool_search_parameter(http) -> None:
    schedule_id, slots = await publish_day(http, 10)
    found = (await http.get("/Slot", params={"schedule": f"Schedule/{schedule_id}", "pool": "reserved"})).json()
    assert sorted(e["resource"]["id"] for e in found["entry"]) == [slots[0], slots[4], slots[8]]
    system = "https://yilian.example.org/fhir/CodeSystem/capacity-pool"
    found = (await http.get("/Slot", params={"schedule": f"Schedule/{schedule_id}", "pool": f"{system}|general"})).json()
    assert found["total"] == 7


async def test_r20_withdrawn_slot_leaves_the_count_and_another_free_slot_becomes_reserved(http, engine) -> None:
    _, slots = await publish_day(http, 8)  # 2 reserved: 0 and 4
    assert (await http.delete(f"/Slot/{slots[0]}")).status_code == 204
    remaining = slots[1:]
    assert pools(engine, remaining).count("reserved") == 2


# -- the policy file and the admin API --------------------------------------------------------

def test_r20_policy_file_defaults_carry_their_rule_ids() -> None:
    policy = load_policy_file()
    assert policy.specialist_reserved_share == 0.25
    assert abs(policy.outpatient_reserved_share - 1 / 3) < 1e-12
    assert policy.bed_reserved_share == 0.25
    assert policy.release_before.total_seconds() == 24 * 3600
    assert policy.hold_ttl.total_seconds() == 600
    raw = json.loads(Path("mappings/capacity-policy.json").read_text(encoding="utf-8"))
    assert {entry["rule"] for entry in raw["policy"].values()} <= {"R20", "R21", "R23", "R32"}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("specialist_reserved_share", 1.5, "specialist_reserved_share: 1.5 is outside 0..1"),
    ("hold_ttl", "ten minutes", "hold_ttl: 'ten minutes' is not an ISO 8601 duration"),
    ("bed_reserved_share", "a third", "bed_reserved_share: 'a third' is not a share"),
])
def test_a_broken_policy_file_names_the_file_and_the_field(tmp_path: Path, field: str, value: object,
                                                           message: str) -> None:
    raw = json.loads(Path("mappings/capacity-policy.json").read_text(encoding="utf-8"))
    raw["policy"][field]["value"] = value
    broken = tmp_path / "capacity-policy.json"
    broken.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(PolicyError) as error:
        load_policy_file(broken)
    assert str(broken) in str(error.value) and message in str(error.value)


def test_a_policy_file_without_a_rule_id_is_refused(tmp_path: Path) -> None:
    raw = json.loads(Path("mappings/capacity-policy.json").read_text(encoding="utf-8"))
    del raw["policy"]["release_before"]["rule"]
    broken = tmp_path / "p.json"
    broken.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(PolicyError, match="release_before needs the rule id"):
        load_policy_file(broken)


async def test_r20_admin_policy_change_is_validated_warned_and_audited(http) -> None:
    refused = await http.put(f"{ADMIN}/policy/{CARDIOLOGY}", json={"specialist_reserved_share": "lots"})
    assert refused.status_code == 422
    assert refused.json()["issue"][0]["expression"] == ["specialist_reserved_share"]
    unknown = await http.put(f"{ADMIN}/policy/{CARDIOLOGY}", json={"reserved": 0.3})
    assert unknown.status_code == 422

    warned = await http.put(f"{ADMIN}/policy/{CARDIOLOGY}", json={"specialist_reserved_share": 0.4},
                            headers={"X-Yilian-Organization": HOSPITAL})
    assert warned.status_code == 200
    body = warned.json()
    assert body["effective"]["specialist_reserved_share"] == 0.4
    assert "outside the 0.20-0.30 band of R20" in body["warnings"][0]
    await http.put(f"{ADMIN}/policy/{CARDIOLOGY}", json={"hold_ttl": "PT5M"})
    effective = (await http.get(f"{ADMIN}/policy/{CARDIOLOGY}")).json()["effective"]
    assert effective["hold_ttl"] == "PT5M" and effective["specialist_reserved_share"] == 0.4

    history = (await http.get(f"{ADMIN}/policy/{CARDIOLOGY}/_history")).json()["history"]
    assert [h["new"] for h in history][:2] == [{"specialist_reserved_share": 0.4, "hold_ttl": "PT5M"},
                                               {"specialist_reserved_share": 0.4}]
    assert history[1]["changed_by"] == HOSPITAL and history[1]["changed_at"].startswith("2026-03-01T01:00")
    assert history[0]["old"] == {"specialist_reserved_share": 0.4}

    assert (await http.delete(f"{ADMIN}/policy/{CARDIOLOGY}")).status_code == 204
    assert (await http.get(f"{ADMIN}/policy/{CARDIOLOGY}")).json()["override"] is None
    assert (await http.get(f"{ADMIN}/policy/{CARDIOLOGY}/_history")).json()["history"][0]["new"] is None


async def test_admin_policy_if_match_refuses_a_stale_change(http) -> None:
    first = (await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"release_before": "PT12H"})).json()
    version = first["override"]["version"]
    await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"release_before": "PT6H"})
    stale = await http.put(f"{ADMIN}/policy/{HOSPITAL}", json={"release_before": "PT2H"},
                           headers={"If-Match": f'W/"{version}"'})
    assert stale.status_code == 412


async def test_capability_statement_lists_the_capacity_operations(http) -> None:
    statement = (await http.get("/metadata")).json()
    appointment = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Appointment")
    names = {op["name"] for op in appointment["operation"]}
    assert {"find", "hold", "book", "cancel"} <= names
    definitions = {op["definition"] for op in appointment["operation"]}
    for name in ("find", "hold", "book", "cancel"):
        url = f"https://yilian.example.org/fhir/OperationDefinition/appointment-{name}"
        assert url in definitions
        assert json.loads(Path(f"fhir_profiles/OperationDefinition-appointment-{name}.json").read_text())["url"] == url
    slot = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Slot")
    assert "pool" in {p["name"] for p in slot["searchParam"]}


async def test_r20_every_policy_change_is_an_audit_event(http, capacity_app) -> None:
    """Issue #5 point 1 ("every change audited") with issue #4's trail: who changed which
    policy, when, to what — committed with the change, found by AuditEvent?entity=."""
    import orjson

    from service.fhir.access import AccessContext
    from service.security.audit import drain

    headers = {"X-Yilian-Organization": HOSPITAL}
    assert (await http.put(f"{ADMIN}/policy/{ENDOCRINOLOGY}", json={"specialist_reserved_share": 0.3},
                           headers=headers)).status_code == 200
    assert (await http.put(f"{ADMIN}/policy/{ENDOCRINOLOGY}", json={"specialist_reserved_share": 0.28},
                           headers=headers)).status_code == 200
    assert (await http.delete(f"{ADMIN}/policy/{ENDOCRINOLOGY}", headers=headers)).status_code == 204
    drain(capacity_app.state.store)
    bundle = orjson.loads(capacity_app.state.store.search(
        AccessContext.internal("test"), "AuditEvent", [("entity", ENDOCRINOLOGY), ("subtype", "110131")],
        base_url=""))
    events = sorted((e["resource"] for e in bundle.get("entry", [])), key=lambda e: e["recorded"])[-3:]
    assert [e["action"] for e in events] == ["C", "U", "D"]
    assert "0.28" in events[1]["outcomeDesc"]
    assert all(e["type"]["code"] == "110113" and e["agent"][0]["extension"][0]["valueReference"]["reference"]
               == HOSPITAL for e in events)
