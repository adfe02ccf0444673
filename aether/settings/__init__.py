"""aether's settings: one table of them all (``table``), the kinds of value they take
(``kinds``), where each is read from (``sources``: flag, ``AETHER_*`` variable, ``config.json``,
default), the resolved settings of ``aether serve`` (``serve``), and the tables of
docs/settings.md written from the table (``markdown``, ``python -m aether.settings``).

Nothing here imports the server: the command line, the doctor, the registry's command and
the parts that read an environment-only setting all use it.
"""
