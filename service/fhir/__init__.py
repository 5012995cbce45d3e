"""The FHIR layer: resource store, search, bundles and validation. Knows nothing of referrals."""
