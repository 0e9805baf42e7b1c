"""gatekeeper: gate escrow releases, notifications and CI/CD pipelines on facts.

Modules, one concept each:

- ``problems``    a located error (file, line, column, key path) shared by loaders and ``check``
- ``config``      ``gatekeeper.yaml``: listen address, database, targets, escrows
- ``expressions`` the sandboxed ``when`` language (simpleeval)
- ``templates``   ``${name}`` message templates
- ``rules``       typed rules and rulesets (what the loader produces, what the engine runs)
- ``loader``      YAML rule files to a validated ``Ruleset`` (the only place YAML is parsed)
- ``engine``      pure evaluation: facts in, decisions and queued actions out, no I/O
- ``store``       the storage interface and its SQLite implementation
- ``actions``     turning a queued action into a signed HTTP request
- ``delivery``    the outbox dispatcher: retries with backoff, dead letters
- ``daemon``      wiring: the live ruleset, ingest, hot reload
- ``server``      the aiohttp HTTP API
- ``cli``         the ``gatekeeper`` command
"""

__version__ = "0.1.0"
