"""fedmte.client: the site agent, run inside a data owner's network.

It reads the site file, loads the site's data and the candidate models, computes and
releases the statistics the site's privacy policy allows, and keeps the audit log of every
release. It depends on ``fedmte.protocol`` (and the shared Flower codec
``fedmte.flower_records``), never on ``fedmte.server`` or ``fedmte.trial``.
"""
