"""Port attributes: rules that give a port a label, a visibility, a protocol and what a client
does when it opens, matched by port, range or an expression on the command line
(docs/attributes.md).

:mod:`.rules` is the matcher (pure: :class:`~.rules.Ruleset.resolve` on every port open);
:mod:`.formats` reads each format's value into rules (pure); :mod:`.jsonc` is JSON with
comments; :mod:`.sources` reads the files, beneath the workspace root, and says which paths to
watch. ``re2`` is loaded only when a file holds an expression, ``yaml`` only when there is a
``.gitpod.yml``.
"""
