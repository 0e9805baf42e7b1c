"""gatekeeper: gate escrow releases, notifications and CI/CD pipelines on facts.

One package per part of the design; imports point one way, down this list (each package's
``__init__`` says what it owns and what it may import):

- ``cli``       the ``gatekeeper`` command, one module per command
- ``http``      the aiohttp HTTP API: auth, routes, JSON views, OpenAPI
- ``runtime``   the daemon: ingest, the live ruleset and its reload, deadlines, views, hooks
- ``delivery``  signed requests for actions, the outbox dispatcher, the retry policy
- ``store``     durable state behind the Store contract (SQLite today)
- ``engine``    pure evaluation: facts in, decisions and queued actions out; ledger, deadlines
- ``rules``     the rule model, the rule-file loader, ``${name}`` templates
- ``expr``      the sandboxed ``when`` language

The ground floor, which every package may import and which imports none of them:
``clock`` (RFC 3339 times, the injectable clock), ``problems`` (a located error),
``config`` (``gatekeeper.yaml``), ``yamlsource`` (YAML with line numbers and schema
checks), ``schemas`` (the JSON Schemas, package data), ``jsonwire`` (strict JSON helpers)
and ``metrics`` (Prometheus metrics, fed plain values).
"""

__version__ = "0.1.0"
