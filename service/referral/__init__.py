"""Two-way referral (双向转诊): routing, the closed-loop Task workflow, the hand-back to the
contracted family doctor (R30-R43, R12a), after HL7 BSeR and AU eRequesting.

* :mod:`workflow` — the Task transition table and the business steps;
* :mod:`routing` and :mod:`catalogue` — where a referral goes and whether the catalogue
  supports it (``mappings/referral-catalogue.csv``);
* :mod:`sla` — deadlines, the overdue sweep and escalation;
* :mod:`downward` — the follow-up plan, bed request and long prescriptions;
* :mod:`insurance` — the deductible waiver of a direct referral;
* :mod:`hooks` — all of it on every write path; :func:`install` plugs it into an app;
* :mod:`cli` — ``yilian referral sweep``. The HTTP side (``$route``) is ``service.api.referral``.
"""

from service.referral.hooks import install

__all__ = ["install"]
