"""fedmte.trial: tools to try fedmte on one machine, not part of a deployment.

The demo (:mod:`fedmte.trial.demo`, ``fedmte demo``), the model zoo it scores
(:mod:`fedmte.trial.zoo`), the loopback federation (:mod:`fedmte.trial.local_federation`,
``fedmte local``) with its site folders (:mod:`fedmte.trial.local_sites`) and test certificates
and node keys (:mod:`fedmte.trial.credentials`), and the in-process transport
(:mod:`fedmte.trial.inprocess`) that runs a job with no network.

The coordinator (``fedmte.server``) and the site agent (``fedmte.client``) each depend on
``fedmte.protocol`` only; this package sits apart from both and may import both.
"""
