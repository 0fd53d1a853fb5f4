"""fedmte.server: the coordinator.

It reads the job, drives the statistics rounds over Flower (through secure aggregation
when the job asks for it), ranks the candidates and writes the report. It depends on
``fedmte.protocol`` (and the shared Flower codec ``fedmte.flower_records``), never on
``fedmte.client`` or ``fedmte.trial``.
"""
