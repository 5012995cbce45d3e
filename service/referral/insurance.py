"""The insurance effect of a direct referral (R33).

A patient referred *directly* — through the alliance's referral channel, to a designated
institution — does not pay the outpatient deductible (起付线) at the referring institution
again. Yilian computes it when the referral is sent and records it on the referral as the
extension ``referral-deductible-waiver`` (``fhir_profiles/``), for the HIS and the insurance
system to apply. The amounts are policy data (``insurance`` in ``mappings/referral-policy.json``)
per insurance scheme (``Coverage.type``) and level of the referring institution.

Designated (定点) institutions: the members of the sender's alliance (``designated:
alliance-members``); a receiver outside the alliance gets ``waived: false`` with the reason.
"""

from __future__ import annotations

from typing import Any

from service.fhir.store import StoreTransaction
from service.referral import _directory as directory
from service.referral.codes import COVERAGE_TYPE, codes_in, ref_of, reference
from service.referral.policy import Policy


def deductible_waiver(tx: StoreTransaction, policy: Policy, referral: dict[str, Any], sender: str | None,
                      receiver: str | None) -> dict[str, Any]:
    """The content of the ``referral-deductible-waiver`` extension for a referral being sent."""
    coverage_ref, coverage = _coverage(tx, referral)
    parts: list[dict[str, Any]] = []

    def result(waived: bool, basis: str, amount: float | None = None) -> dict[str, Any]:
        parts.insert(0, {"url": "waived", "valueBoolean": waived})
        if amount is not None:
            parts.append({"url": "amount", "valueMoney": {"value": amount, "currency": policy.currency}})
        if coverage_ref:
            parts.append({"url": "coverage", "valueReference": reference(coverage_ref)})
        if sender:
            parts.append({"url": "institution", "valueReference": reference(sender)})
        parts.append({"url": "basis", "valueString": f"{basis} (R33)"})
        return {"extension": parts}

    if coverage is None:
        return result(False, "no active Coverage of the patient: nothing to waive")
    schemes = codes_in(coverage.get("type"), COVERAGE_TYPE)
    scheme = next((s for s in schemes if s in policy.deductible), None)
    if scheme is None:
        return result(False, f"insurance scheme {', '.join(schemes) or '(none)'} has no deductible in "
                             f"{policy.source}")
    alliance = directory.alliance_of(tx, sender)
    if alliance is None or receiver is None or directory.alliance_of(tx, receiver) != alliance:
        return result(False, f"{receiver or 'the receiver'} is not a designated institution of the sender's "
                             f"alliance {alliance or '(none)'}: not a direct referral")
    level = directory.institution_level(tx, sender) or "primary"
    amount = policy.deductible[scheme].get(level)
    if amount is None:
        return result(False, f"{policy.source} sets no {scheme} deductible at the {level} level")
    return result(True, f"direct referral from the {level} institution {sender} to {receiver}, a member of "
                        f"{alliance}: the {scheme} outpatient deductible at the referring institution is waived",
                  amount)


def _coverage(tx: StoreTransaction, referral: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The Coverage named in ``insurance``, else the patient's active one."""
    for item in referral.get("insurance") or []:
        ref = ref_of(item)
        coverage = directory.content(tx, ref) if ref and ref.startswith("Coverage/") else None
        if coverage is not None:
            return ref, coverage
    patient = ref_of(referral.get("subject"))
    if not patient:
        return None, None
    for coverage_id in tx.find("Coverage", f"beneficiary={patient}&status=active", limit=5):
        coverage = tx.current_content("Coverage", coverage_id)
        if coverage is not None:
            return f"Coverage/{coverage_id}", coverage
    return None, None
