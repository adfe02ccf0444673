"""The port registry: named, labelled ports (:mod:`.store`) and the ``aether port`` commands
(:mod:`.cli`)."""
