"""fedmte.protocol: the pure core that the site agent and the coordinator share.

Statistics and their catalogue, scorers as pure functions of summed statistics, scoring
plans, secure-sum and differential-privacy math, and the wire schemas of every message.
No Flower and no I/O: it computes on what it is given and returns values. It imports
nothing from ``fedmte.client``, ``fedmte.server`` or ``fedmte.trial``.
"""
