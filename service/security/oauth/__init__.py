"""The OAuth 2.0 / SMART on FHIR authorization server (authlib core on FastAPI).

Modules: ``config`` (settings, public URLs), ``keys`` (our signing keys), ``tokens`` (access
and refresh tokens, revocation list), ``client_auth`` (private_key_jwt), ``grants`` and
``endpoints`` (authlib subclasses), ``server`` (the Starlette adapter), ``router`` (HTTP),
``pages`` (login / consent HTML), ``bearer`` (tokens on incoming requests), ``admin`` (the
admin API), ``runtime`` (all of it wired once per app).
"""
