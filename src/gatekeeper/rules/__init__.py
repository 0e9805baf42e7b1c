"""Rules as written and as loaded: the typed rule model, ``${name}`` templates, and the loader
that turns rule files into one validated ``Ruleset``.

Owns: ``model`` (``Rule``, ``Ruleset``, actions), ``templates``, ``loader`` (the only place
rule YAML is read; all-or-nothing, every problem located by file, line and key path),
``pipelines`` (the documented limits of the CI services pipeline actions start), ``loops``
(the graph of rules feeding each other through set_fact, and the loops ``check`` refuses).

May import: ``gatekeeper.expr`` and the ground floor (``config``, ``yamlsource``,
``schemas``, ``problems``, ``clock``).
"""
