"""Secure sum of site statistics: the coordinator learns the sum over the sites and nothing else.

The protocol follows Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017 (Figure 4, the semi-honest protocol, with the signed keys of its
malicious-server variant), on a fixed roster of ``N >= 3`` sites with threshold
``t > N / 2``. This module is pure: messages are pydantic models and arrays, and moving
them between sites and coordinator is the caller's business.

Setup, once per job (two round trips)
-------------------------------------
1. **Advertise** (:meth:`SiteSecureSum.advertise`). Site ``u`` draws an X25519 *channel*
   key pair ``(c_u, C_u)`` and, for every phase ``p`` of the job, an X25519 *mask* key pair
   ``(s_u^p, S_u^p)`` and a 32-byte self-mask seed ``b_u^p``. It signs with its Ed25519
   identity key ``(job, params digest, u, C_u, S_u^1..P, H(b_u^1)..H(b_u^P))``.
2. **Share** (:meth:`SiteSecureSum.share`). Each site verifies every advertisement against
   the identity keys of the roster *it* holds (an unknown signer, a bad signature, another
   job or other parameters are refused), Shamir-shares (t of N, :mod:`.shamir`) every
   ``b_u^p`` and every ``s_u^p`` and sends peer ``v`` its shares encrypted with AES-256-GCM
   under ``HKDF(X25519(c_u, C_v))``. The coordinator only routes the ciphertexts.

Phase ``p`` (numbered from 0; one masked upload, one unmask reply if anything needs unmasking)
----------------------------------------------------------------------------------------------
3. **Mask** (:meth:`SiteSecureSum.mask`). With ``E`` the fixed-point encoding of
   :mod:`.fixed_point` and ``PRG`` AES-256-CTR keyed by an HKDF-SHA256 output,

       y_u = E(x_u) + PRG(b_u^p) + sum_{v != u} sigma_uv * PRG(k_uv^p)   (mod 2^(64 L)),

   where ``k_uv^p = HKDF(X25519(s_u^p, S_v^p), info = job, phase, pair, spec)`` and
   ``sigma_uv = +1`` if ``u`` precedes ``v`` in the roster, else ``-1``. The pairwise masks
   cancel in the sum over all sites. A phase is masked once: a second upload under the
   same masks would reveal the difference of the two inputs.
4. **Unmask** (:meth:`CoordinatorSecureSum.unmask_request`, :meth:`SiteSecureSum.reveal`).
   The coordinator names the sites whose uploads it summed (active ``A``) and the others
   (dropped ``D``). Each site checks that ``A`` and ``D`` are disjoint, cover the sites that
   shared keys, contain itself in ``A``, and that ``|A| >= t``; then it releases its share
   of ``b_v^p`` for each ``v`` in ``A`` and of ``s_v^p`` for each ``v`` in ``D``. The first
   lists a site acts on are fixed for the whole job (below): a later request, in any phase,
   naming another active set is refused with :class:`ActiveSetError`, and the site stops
   taking part in the job.
5. **Finish** (:meth:`CoordinatorSecureSum.finish`). From ``t`` or more replies the
   coordinator recovers the self-mask seeds of ``A`` (checked against their advertised
   hashes) and the mask keys of ``D`` (checked against their advertised public keys),
   removes the self masks and the masks between ``D`` and ``A``, and decodes. Fewer than
   ``t`` uploads or replies raise :class:`ThresholdError` and release nothing.

Why a strict majority
---------------------
A site releases, per phase and peer, either the seed share or the key share, never both.
To unmask one upload the coordinator would need ``t`` seed shares *and* ``t`` key shares of
the same site from two disjoint groups of sites (it may tell different sites different
stories), which ``t > N / 2`` rules out.

Why the active set is fixed for the job
---------------------------------------
Per phase, the rule above keeps every single upload hidden. Across phases it is not enough:
a job that asks for the same statistics in three phases and declares another site dropped
in each (``D = {c}``, then ``{a}``, then ``{b}``) gets ``a + b``, ``b + c`` and ``a + c``,
and so every site's exact statistics, although no upload was ever unmasked. So the active
set is fixed per job by the first masked upload:

* A site masks against every site that shared keys (the participants). The first unmask
  request it answers fixes ``(A, D)`` for the job; in the one-round mode, where a phase
  without dropouts is summed with no request at all, a site that masks a second phase
  before any request fixes ``(participants, ())``, since the first phase may already have
  been summed over everyone. A later request naming another ``A`` is refused, audited, and
  the job is over at that site (:class:`ActiveSetError`; the site keeps nothing of it).
* The coordinator (:class:`CoordinatorSecureSum`) fixes the sites whose uploads it summed
  in the first phase it closes (at least ``t``, or nothing is released and the job aborts),
  refuses uploads from any other site afterwards, and aborts the job, releasing nothing,
  when a site of that set does not upload a later phase. A dropout after the first phase
  ends the job: it never continues with a smaller active set.

With self masks, a coordinator that lies cannot get around this by telling different sites
different stories: each phase's result needs reveals from ``t`` sites that accepted its
``A``. Two results under different active sets would need two groups of ``t`` sites,
disjoint (a site that answered for one set refuses the other), and ``t > N / 2`` rules that
out. So within a job the statistics are unmasked under one active set only. (In the
one-round mode the first phase is summed over everyone without any reply, and a request
for it naming a smaller set can still follow: that is the price of the mode, below.) Across
jobs, every job has fresh keys,
seeds and masks, and a request digest (:mod:`.secure_rounds`) binds the job id, which a site
never accepts twice (:mod:`fedmte.client.secure_site`), so no phase is ever unmasked twice.
A coordinator that runs a *new* job asking for the same statistics with another site
missing gets a new release, and what repeated releases of the same data reveal is governed
by the sites' DP noise and their privacy ledgers, which charge each release; with DP off,
two jobs over different sets of sites differ by the missing site's exact statistics, as
two plain jobs would.

Why mask keys are per phase
---------------------------
Keys are agreed once per job, but every phase has its own mask key pair and seed (all
advertised and shared in the one setup). With a single per-job mask key ``s_u``, a site that
drops in phase 3 has ``s_u`` reconstructed; the coordinator already holds ``y_u`` and
``b_u`` of phases 1 and 2 (where ``u`` was active), so it could remove every mask from them
and read ``x_u`` of the earlier phases. Per-phase keys confine a reconstruction to the phase
in which the site dropped. The HKDF ``info`` also binds the job, phase, pair and sum spec.

What the self masks buy, and the one-round mode
-----------------------------------------------
With ``self_masks=True`` (the default, as in the paper) every phase ends with the unmask
reply, because the coordinator needs the survivors' seed shares. A coordinator that
receives ``y_u`` and *also* declares ``u`` dropped (a late message, or a lie) gets ``s_u^p``
but never ``b_u^p`` from an honest majority, so ``x_u`` stays hidden.

With ``self_masks=False`` a phase without dropouts costs one upload and no reply: the
pairwise masks cancel by themselves. The price is exactly that case: a coordinator that
holds ``u``'s upload and declares ``u`` dropped anyway learns ``x_u`` for that phase (it can
then compute both the sum with ``u`` and the sum without it; no one-round protocol with
dropout recovery can prevent this), and, with ``u`` dropped for the whole job, in every
later phase in which it obtains an upload from ``u``. Against a coordinator that follows
the protocol and discards late uploads it reveals only the sum. Sites refuse jobs without
self masks unless their owner sets ``require_self_masks = false``
(:mod:`fedmte.client.secure_site`); use it only with site-level DP noise.

Round trips and wire form
-------------------------
Setup costs two round trips per job. A phase costs one (the upload) in the one-round mode
without dropouts, and two (upload, unmask reply) otherwise. ``MaskedUpload.words`` are
uint64 words; a transport must carry them as little-endian (``"<u8"``) bytes or arrays.

What this module does not do
----------------------------
Transport authentication and replay protection of requests (the coordinator's signatures,
TLS, node authentication), the consistency round in which sites confirm they saw the same
model hashes and the same ``A``/``D`` lists, and the audit log belong to the network layer.
Collusion of the coordinator with ``t`` or more sites reveals any site's input; so does the
sum itself when ``N - 1`` sites collude.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmte.protocol import shamir
from fedmte.protocol.encoding import frame
from fedmte.protocol.errors import ProtocolError, ThresholdError, VerificationError
from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec, ring_add, ring_sub
from fedmte.protocol.statistics import Statistics

PARAMS_SCHEMA = "fedmte.secure_sum_params.v1"
ADVERTISEMENT_SCHEMA = "fedmte.secure_sum_advertisement.v1"
SHARES_SCHEMA = "fedmte.secure_sum_shares.v1"
UPLOAD_SCHEMA = "fedmte.secure_sum_upload.v1"
UNMASK_SCHEMA = "fedmte.secure_sum_unmask.v1"
REVEAL_SCHEMA = "fedmte.secure_sum_reveal.v1"

MIN_SITES = 3
MAX_SITES = 256
MAX_PHASES = 1024
KEY_BYTES = 32
NONCE_BYTES = 12
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# One domain-separation constant per purpose (HKDF info prefixes, signed and hashed encodings).
_ADVERTISEMENT_DOMAIN = b"fedmte.secure_sum.advertisement.v1"
_SEED_COMMITMENT_DOMAIN = b"fedmte.secure_sum.seed_commitment.v1"
_SHARES_AAD_DOMAIN = b"fedmte.secure_sum.shares.v1"
_INFO_CHANNEL = b"fedmte.secure_sum.channel.v1"
_INFO_PAIR_MASK = b"fedmte.secure_sum.pair_mask.v1"
_INFO_SELF_MASK = b"fedmte.secure_sum.self_mask.v1"

class ActiveSetError(ProtocolError):
    """An unmask request, or a phase's uploads, naming another active set than the one fixed
    for the job by its first masked upload (module docstring): the job is over, and nothing
    more is revealed or released in it."""
SiteId = Annotated[str, Field(pattern=SITE_ID_PATTERN)]
Key32 = Annotated[bytes, Field(min_length=KEY_BYTES, max_length=KEY_BYTES)]
ShareY = Annotated[bytes, Field(min_length=shamir.SHARE_BYTES, max_length=shamir.SHARE_BYTES)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


# --------------------------------------------------------------------------- messages

class SecureSumParams(_Wire):
    """The public parameters of a job's secure sum, identical at every site and the
    coordinator: the roster in order (its order fixes the Shamir coordinates and mask
    signs), the threshold ``t`` with ``N / 2 < t <= N``, the number of phases, and whether
    self masks are used (see the module docstring)."""

    schema_: Literal["fedmte.secure_sum_params.v1"] = Field(default=PARAMS_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    sites: tuple[SiteId, ...] = Field(min_length=MIN_SITES, max_length=MAX_SITES)
    threshold: int
    phases: int = Field(ge=1, le=MAX_PHASES)
    self_masks: bool = True

    @model_validator(mode="after")
    def _check(self) -> SecureSumParams:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"the roster lists a site twice: {list(self.sites)}")
        count = len(self.sites)
        if not count // 2 < self.threshold <= count:
            raise ValueError(
                f"the threshold must be a strict majority of the {count} sites, in [{count // 2 + 1}, {count}], "
                f"got {self.threshold}"
            )
        return self

    def digest(self) -> bytes:
        """sha256 of the canonical JSON: what every signature and key derivation binds."""
        return hashlib.sha256(self.model_dump_json(by_alias=True).encode("utf-8")).digest()

    def coordinate(self, site_id: str) -> int:
        """The site's Shamir x-coordinate: its 1-based position in the roster."""
        return self.sites.index(site_id) + 1


def majority_threshold(sites: int) -> int:
    """The smallest valid threshold, ``floor(N / 2) + 1``."""
    return sites // 2 + 1


class Advertisement(_Wire):
    """A site's public keys for one job, signed by its Ed25519 identity key."""

    schema_: Literal["fedmte.secure_sum_advertisement.v1"] = Field(default=ADVERTISEMENT_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    params_digest: Key32
    site_id: SiteId
    channel_key: Key32
    mask_keys: tuple[Key32, ...] = Field(min_length=1, max_length=MAX_PHASES)
    seed_commitments: tuple[Key32, ...] = Field(max_length=MAX_PHASES)
    signature: bytes = Field(min_length=64, max_length=64)

    def signed_bytes(self) -> bytes:
        """The length-prefixed encoding the signature covers (everything but itself)."""
        return frame(
            _ADVERTISEMENT_DOMAIN, self.job_id, self.params_digest, self.site_id, self.channel_key,
            len(self.mask_keys), *self.mask_keys, len(self.seed_commitments), *self.seed_commitments,
        )


class ShareBundle(_Wire):
    """The Shamir shares ``sender`` made for ``recipient``, AES-256-GCM encrypted under
    their channel key; the coordinator routes it without being able to read it."""

    schema_: Literal["fedmte.secure_sum_shares.v1"] = Field(default=SHARES_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    sender: SiteId
    recipient: SiteId
    nonce: bytes = Field(min_length=NONCE_BYTES, max_length=NONCE_BYTES)
    ciphertext: bytes = Field(min_length=16, max_length=16 + 6 + 2 * MAX_PHASES * shamir.SHARE_BYTES)


class MaskedUpload(BaseModel):
    """One site's masked statistics for one phase: ``words`` is a ``(L, size)`` uint64 ring
    vector that is uniformly random to anyone without the masks."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    schema_: Literal["fedmte.secure_sum_upload.v1"] = Field(default=UPLOAD_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    phase: int = Field(ge=0, lt=MAX_PHASES)
    site_id: SiteId
    spec_digest: Key32
    words: np.ndarray

    @field_validator("words")
    @classmethod
    def _ring_vector(cls, words: np.ndarray) -> np.ndarray:
        if not isinstance(words, np.ndarray) or words.dtype != np.uint64 or words.ndim != 2:
            raise ValueError("words must be a 2-D uint64 array (limbs, size)")
        return words


class UnmaskRequest(_Wire):
    """The coordinator's account of a phase: whose uploads it summed and who dropped."""

    schema_: Literal["fedmte.secure_sum_unmask.v1"] = Field(default=UNMASK_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    phase: int = Field(ge=0, lt=MAX_PHASES)
    active: tuple[SiteId, ...] = Field(max_length=MAX_SITES)
    dropped: tuple[SiteId, ...] = Field(max_length=MAX_SITES)


class Reveal(_Wire):
    """One site's answer to an :class:`UnmaskRequest`: its shares of the active sites'
    self-mask seeds and of the dropped sites' mask keys for that phase (``y`` values; the
    x-coordinate is the revealing site's)."""

    schema_: Literal["fedmte.secure_sum_reveal.v1"] = Field(default=REVEAL_SCHEMA, alias="schema")
    job_id: str = Field(min_length=1, max_length=256)
    phase: int = Field(ge=0, lt=MAX_PHASES)
    site_id: SiteId
    seed_shares: dict[SiteId, ShareY] = Field(max_length=MAX_SITES)
    key_shares: dict[SiteId, ShareY] = Field(max_length=MAX_SITES)


# --------------------------------------------------------------------------- verification

def verify_advertisements(
    params: SecureSumParams,
    advertisements: Iterable[Advertisement],
    known_sites: Mapping[str, Ed25519PublicKey],
) -> dict[str, Advertisement]:
    """The advertisements that verify, keyed by site in roster order, or an error.

    Each must be signed by the identity key that ``known_sites`` (the verifier's own
    roster) holds for its site, for this job and these parameters, by a site of the job's
    roster, once. Raises :class:`VerificationError` (unknown signer, bad signature, other
    job), :class:`ProtocolError` (duplicate, wrong number of keys) or
    :class:`ThresholdError` (fewer than ``t`` sites).
    """
    digest = params.digest()
    verified: dict[str, Advertisement] = {}
    for advertisement in advertisements:
        site = advertisement.site_id
        identity = known_sites.get(site)
        if identity is None:
            raise VerificationError(f"advertisement from unknown signer {site!r}: it is not in this roster")
        try:
            identity.verify(advertisement.signature, advertisement.signed_bytes())
        except InvalidSignature:
            raise VerificationError(
                f"the advertisement of {site!r} does not verify against its identity key in this roster; "
                "it was altered or signed by another key"
            ) from None
        if advertisement.job_id != params.job_id or not hmac.compare_digest(advertisement.params_digest, digest):
            raise VerificationError(
                f"the advertisement of {site!r} is for job {advertisement.job_id!r} or other parameters, "
                f"expected job {params.job_id!r} with params digest {digest.hex()}"
            )
        if site not in params.sites:
            raise VerificationError(f"{site!r} signed an advertisement but is not in this job's roster")
        if site in verified:
            raise ProtocolError(f"two advertisements from {site!r}; a site advertises once per job")
        seeds_expected = params.phases if params.self_masks else 0
        if len(advertisement.mask_keys) != params.phases or len(advertisement.seed_commitments) != seeds_expected:
            raise ProtocolError(
                f"the advertisement of {site!r} has {len(advertisement.mask_keys)} mask keys and "
                f"{len(advertisement.seed_commitments)} seed commitments; expected {params.phases} and {seeds_expected}"
            )
        verified[site] = advertisement
    if len(verified) < params.threshold:
        raise ThresholdError(
            f"only {len(verified)} of {len(params.sites)} sites advertised keys; the threshold is {params.threshold}"
        )
    return {site: verified[site] for site in params.sites if site in verified}


def _check_roster(params: SecureSumParams, known_sites: Mapping[str, Ed25519PublicKey]) -> None:
    unknown = [site for site in params.sites if site not in known_sites]
    if unknown:
        raise VerificationError(
            f"the job's roster names sites this roster does not know: {unknown}; add their identity keys "
            "to the local roster only if you trust them"
        )


# --------------------------------------------------------------------------- site

@dataclass
class _Held:
    """The shares a site holds of one owner's secrets: ``y`` bytes per phase."""

    seeds: tuple[bytes, ...]
    keys: tuple[bytes, ...]


class SiteSecureSum:
    """A site's side of the secure sum for one job.

    Call :meth:`advertise`, :meth:`share` and :meth:`receive_shares` once (setup), then per
    phase :meth:`mask` and, if asked, :meth:`reveal`. Every method either completes or
    raises without changing the state.

    Parameters
    ----------
    params : SecureSumParams
        The job's public parameters.
    site_id : str
        This site's name in the roster.
    identity_key : Ed25519PrivateKey
        This site's long-term identity key.
    known_sites : mapping of site id to Ed25519PublicKey
        The roster this site holds itself (never one the coordinator sent); every site of
        ``params.sites`` must be in it.
    """

    def __init__(
        self,
        params: SecureSumParams,
        *,
        site_id: str,
        identity_key: Ed25519PrivateKey,
        known_sites: Mapping[str, Ed25519PublicKey],
    ) -> None:
        if site_id not in params.sites:
            raise ProtocolError(f"this site {site_id!r} is not in the job's roster {list(params.sites)}")
        _check_roster(params, known_sites)
        if known_sites[site_id].public_bytes_raw() != identity_key.public_key().public_bytes_raw():
            raise VerificationError(f"the identity key given does not match the roster's key for {site_id!r}")
        self.params = params
        self.site_id = site_id
        self._known = dict(known_sites)
        self._digest = params.digest()
        self._channel_key = X25519PrivateKey.generate()
        self._mask_keys = tuple(X25519PrivateKey.generate() for _ in range(params.phases))
        self._seeds = tuple(os.urandom(KEY_BYTES) for _ in range(params.phases)) if params.self_masks else ()
        unsigned = Advertisement(
            job_id=params.job_id,
            params_digest=self._digest,
            site_id=site_id,
            channel_key=self._channel_key.public_key().public_bytes_raw(),
            mask_keys=tuple(key.public_key().public_bytes_raw() for key in self._mask_keys),
            seed_commitments=tuple(
                _seed_commitment(params.job_id, site_id, phase, seed) for phase, seed in enumerate(self._seeds)
            ),
            signature=bytes(64),
        )
        self._advertisement = unsigned.model_copy(update={"signature": identity_key.sign(unsigned.signed_bytes())})
        self._peers: dict[str, Advertisement] | None = None
        self._held: dict[str, _Held] = {}
        self._participants: tuple[str, ...] | None = None
        self._masked: set[int] = set()
        self._fixed: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._ended: str | None = None

    @property
    def participants(self) -> tuple[str, ...]:
        """The sites (this one included) whose shares this site holds, in roster order."""
        self._check_running()
        if self._participants is None:
            raise ProtocolError("key setup is not finished: call share() and receive_shares() first")
        return self._participants

    @property
    def fixed_lists(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """The ``(active, dropped)`` lists fixed for this job (roster order), once fixed."""
        return self._fixed

    def _check_running(self) -> None:
        if self._ended is not None:
            raise ProtocolError(f"this site stopped taking part in job {self.params.job_id!r}: {self._ended}")

    def advertise(self) -> Advertisement:
        """This site's signed public keys (setup step 1)."""
        return self._advertisement

    def share(self, advertisements: Sequence[Advertisement]) -> tuple[ShareBundle, ...]:
        """Verify the advertisements the coordinator relayed and encrypt, for every other
        advertised site, its Shamir shares of this site's seeds and mask keys (setup step 2)."""
        self._check_running()
        if self._peers is not None:
            raise ProtocolError("this site already shared its keys for this job; setup runs once")
        peers = verify_advertisements(self.params, advertisements, self._known)
        own = peers.get(self.site_id)
        if own is None or own != self._advertisement:
            raise VerificationError("the relayed advertisements lack this site's own, or carry another one for it")
        coordinates = [self.params.coordinate(site) for site in peers]
        threshold = self.params.threshold
        seed_shares = [shamir.split(seed, xs=coordinates, threshold=threshold) for seed in self._seeds]
        key_shares = [
            shamir.split(key.private_bytes_raw(), xs=coordinates, threshold=threshold) for key in self._mask_keys
        ]
        bundles = []
        held: dict[str, _Held] = {}
        for index, peer in enumerate(peers):
            seeds = tuple(shares[index].y_bytes() for shares in seed_shares)
            keys = tuple(shares[index].y_bytes() for shares in key_shares)
            if peer == self.site_id:
                held[peer] = _Held(seeds, keys)
                continue
            nonce = os.urandom(NONCE_BYTES)
            plaintext = _pack_shares(coordinates[index], seeds, keys)
            channel = AESGCM(self._channel(peers[peer], sender=self.site_id, recipient=peer))
            ciphertext = channel.encrypt(nonce, plaintext, self._shares_aad(self.site_id, peer))
            bundles.append(
                ShareBundle(job_id=self.params.job_id, sender=self.site_id, recipient=peer, nonce=nonce,
                            ciphertext=ciphertext)
            )
        self._peers = peers
        self._held = held
        return tuple(bundles)

    def receive_shares(self, bundles: Sequence[ShareBundle]) -> None:
        """Decrypt and keep the shares other sites made for this one; they fix the
        participants (setup step 2, receiving side)."""
        self._check_running()
        if self._peers is None:
            raise ProtocolError("call share() before receive_shares(): the peers' keys are not verified yet")
        if self._participants is not None:
            raise ProtocolError("this site already received its shares for this job")
        held = dict(self._held)
        own_x = self.params.coordinate(self.site_id)
        seeds_expected = len(self._seeds)
        for bundle in bundles:
            sender = bundle.sender
            if bundle.job_id != self.params.job_id or bundle.recipient != self.site_id:
                raise ProtocolError(
                    f"share bundle from {sender!r} is addressed to {bundle.recipient!r} in job {bundle.job_id!r}, "
                    f"not to {self.site_id!r} in {self.params.job_id!r}"
                )
            if sender not in self._peers or sender == self.site_id:
                raise VerificationError(f"share bundle from {sender!r}, which did not advertise verified keys")
            if sender in held:
                raise ProtocolError(f"two share bundles from {sender!r}")
            channel = AESGCM(self._channel(self._peers[sender], sender=sender, recipient=self.site_id))
            try:
                plaintext = channel.decrypt(bundle.nonce, bundle.ciphertext, self._shares_aad(sender, self.site_id))
            except InvalidTag:
                raise VerificationError(
                    f"the share bundle from {sender!r} fails authentication: altered, or not made by {sender!r}"
                ) from None
            x, seeds, keys = _unpack_shares(plaintext)
            if x != own_x or len(seeds) != seeds_expected or len(keys) != self.params.phases:
                raise VerificationError(f"the share bundle from {sender!r} holds shares for another site or job")
            held[sender] = _Held(seeds, keys)
        participants = tuple(site for site in self.params.sites if site in held)
        if len(participants) < self.params.threshold:
            raise ThresholdError(
                f"only {len(participants)} sites (this one included) shared keys; the threshold is "
                f"{self.params.threshold}"
            )
        self._held = held
        self._participants = participants

    def mask(self, statistics: Statistics, *, phase: int, spec: SumSpec) -> MaskedUpload:
        """This site's statistics for ``phase``, encoded and masked (step 3). Each phase can
        be masked once. In the one-round mode, masking a second phase before any unmask
        request fixes the active set to every participant (module docstring)."""
        participants = self.participants
        self._check_phase(phase)
        if phase in self._masked:
            raise ProtocolError(
                f"phase {phase} is already masked; a second upload under the same masks would reveal the "
                "difference of the two inputs"
            )
        codec = FixedPointCodec(spec, max_sites=len(self.params.sites))
        spec_digest = spec.digest()
        words = codec.encode(statistics)
        stream = _Keystream(codec.limbs, codec.size)
        if self.params.self_masks:
            seed = _self_mask_seed(self._seeds[phase], self._digest, self.params.job_id, phase, self.site_id,
                                   spec_digest)
            ring_add(words, stream.fill(seed))
        own_x = self.params.coordinate(self.site_id)
        assert self._peers is not None
        for peer in participants:
            if peer == self.site_id:
                continue
            shared = _exchange(self._mask_keys[phase], self._peers[peer].mask_keys[phase], peer)
            seed = _pair_mask_seed(shared, self.params, self._digest, phase, self.site_id, peer, spec_digest)
            mask = stream.fill(seed)
            if own_x < self.params.coordinate(peer):
                ring_add(words, mask)
            else:
                ring_sub(words, mask)
        if self._masked and self._fixed is None and not self.params.self_masks:
            self._fixed = (participants, ())  # the first phase may have been summed over everyone
        self._masked.add(phase)
        return MaskedUpload(job_id=self.params.job_id, phase=phase, site_id=self.site_id, spec_digest=spec_digest,
                            words=words)

    def reveal(self, request: UnmaskRequest) -> Reveal:
        """The shares the coordinator needs to unmask ``request.phase`` (step 4), after
        checking the request. Raises :class:`ProtocolError` for overlapping, incomplete or
        foreign lists and for a phase this site did not upload, :class:`ThresholdError`
        below ``t``, and :class:`ActiveSetError` for lists other than those fixed for the
        job (module docstring), after which this site takes no further part in the job.
        The first request answered fixes the lists."""
        participants = self.participants
        if request.job_id != self.params.job_id:
            raise ProtocolError(f"unmask request for job {request.job_id!r}, this is {self.params.job_id!r}")
        phase = request.phase
        self._check_phase(phase)
        active, dropped = set(request.active), set(request.dropped)
        if len(active) != len(request.active) or len(dropped) != len(request.dropped):
            raise ProtocolError("the unmask request lists a site twice in one list")
        both = sorted(active & dropped)
        if both:
            raise ProtocolError(f"refusing to reveal: {both} listed as both active and dropped in phase {phase}")
        listed = active | dropped
        missing, foreign = sorted(set(participants) - listed), sorted(listed - set(participants))
        if missing or foreign:
            raise ProtocolError(
                f"refusing to reveal: the lists must cover exactly the sites that shared keys; "
                f"neither active nor dropped: {missing}; not participants: {foreign}"
            )
        lists = (tuple(site for site in participants if site in active),
                 tuple(site for site in participants if site in dropped))
        if self._fixed is not None and lists != self._fixed:
            fixed_active, fixed_dropped = self._fixed
            flipped = sorted(set(fixed_active) ^ active)
            self._ended = (f"an unmask request for phase {phase} named another active set than the one fixed for "
                           "the job")
            raise ActiveSetError(
                f"refusing to reveal, and leaving job {self.params.job_id!r}: the unmask request for phase {phase} "
                f"names active {list(lists[0])}, dropped {list(lists[1])}, but this job's active set was fixed at "
                f"active {list(fixed_active)}, dropped {list(fixed_dropped)} by its first masked upload; {flipped} "
                "would change sides. Sums of the same statistics over different sets of sites give single sites' "
                "statistics by difference, so a job never continues with another active set"
            )
        if self.site_id not in active:
            raise ProtocolError(f"refusing to reveal: this site is listed as dropped in phase {phase}")
        if phase not in self._masked:
            raise ProtocolError(f"refusing to reveal: this site has not uploaded phase {phase}")
        if len(active) < self.params.threshold:
            raise ThresholdError(
                f"refusing to reveal: only {len(active)} active sites in phase {phase}, the threshold is "
                f"{self.params.threshold}"
            )
        self._fixed = lists
        seed_shares = {site: self._held[site].seeds[phase] for site in participants if site in active} \
            if self.params.self_masks else {}
        key_shares = {site: self._held[site].keys[phase] for site in participants if site in dropped}
        return Reveal(job_id=self.params.job_id, phase=phase, site_id=self.site_id, seed_shares=seed_shares,
                      key_shares=key_shares)

    def _check_phase(self, phase: int) -> None:
        if not 0 <= phase < self.params.phases:
            raise ProtocolError(f"phase {phase} is outside this job's phases 0..{self.params.phases - 1}")

    def _channel(self, peer: Advertisement, *, sender: str, recipient: str) -> bytes:
        shared = _exchange(self._channel_key, peer.channel_key, peer.site_id)
        return HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=self._digest,
            info=frame(_INFO_CHANNEL, self.params.job_id, sender, recipient),
        ).derive(shared)

    def _shares_aad(self, sender: str, recipient: str) -> bytes:
        return frame(_SHARES_AAD_DOMAIN, self.params.job_id, self._digest, sender, recipient)


# --------------------------------------------------------------------------- coordinator

@dataclass
class _Phase:
    codec: FixedPointCodec
    spec_digest: bytes
    total: np.ndarray
    uploaded: list[str] = field(default_factory=list)
    closed: bool = False
    request: UnmaskRequest | None = None


class CoordinatorSecureSum:
    """The coordinator's side of the secure sum for one job.

    Setup: :meth:`collect_advertisements` then :meth:`route_shares`. Per phase:
    :meth:`open_phase`, :meth:`add_upload` for each upload that arrives,
    :meth:`unmask_request` (``None`` when nothing needs revealing), then :meth:`finish`
    with the sites' :class:`Reveal` replies. The first phase closed fixes the active set
    for the job (:attr:`fixed_lists`); a later phase without an upload from each of those
    sites raises :class:`ActiveSetError` and releases nothing.
    """

    def __init__(self, params: SecureSumParams, *, known_sites: Mapping[str, Ed25519PublicKey]) -> None:
        _check_roster(params, known_sites)
        self.params = params
        self._known = dict(known_sites)
        self._digest = params.digest()
        self._advertisements: dict[str, Advertisement] | None = None
        self._participants: tuple[str, ...] | None = None
        self._phases: dict[int, _Phase] = {}
        self._done: set[int] = set()
        self._fixed: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def participants(self) -> tuple[str, ...]:
        """The sites whose shares were routed to all others, in roster order."""
        if self._participants is None:
            raise ProtocolError("key setup is not finished: call route_shares() first")
        return self._participants

    @property
    def fixed_lists(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """``(active, dropped)`` as fixed by the first phase closed, in roster order."""
        return self._fixed

    def collect_advertisements(self, advertisements: Sequence[Advertisement]) -> tuple[Advertisement, ...]:
        """Verify the sites' advertisements; returns them in roster order, to relay to every site."""
        if self._advertisements is not None:
            raise ProtocolError("advertisements were already collected for this job")
        self._advertisements = verify_advertisements(self.params, advertisements, self._known)
        return tuple(self._advertisements.values())

    def route_shares(self, bundles: Sequence[ShareBundle]) -> dict[str, tuple[ShareBundle, ...]]:
        """Group the encrypted share bundles by recipient. A site is a participant only if it
        sent bundles to every other participant; the result maps each participant to the
        bundles the other participants made for it."""
        if self._advertisements is None:
            raise ProtocolError("collect the advertisements before routing shares")
        if self._participants is not None:
            raise ProtocolError("shares were already routed for this job")
        by_sender: dict[str, dict[str, ShareBundle]] = {}
        for bundle in bundles:
            if bundle.job_id != self.params.job_id:
                raise ProtocolError(f"share bundle for job {bundle.job_id!r}, this is {self.params.job_id!r}")
            if bundle.sender not in self._advertisements or bundle.recipient not in self._advertisements \
                    or bundle.sender == bundle.recipient:
                raise ProtocolError(f"share bundle {bundle.sender!r} -> {bundle.recipient!r} between unknown sites")
            addressed = by_sender.setdefault(bundle.sender, {})
            if bundle.recipient in addressed:
                raise ProtocolError(f"two share bundles {bundle.sender!r} -> {bundle.recipient!r}")
            addressed[bundle.recipient] = bundle
        members = set(by_sender)
        while True:
            complete = {site for site in members if members - {site} <= set(by_sender[site])}
            if complete == members:
                break
            members = complete
        participants = tuple(site for site in self.params.sites if site in members)
        if len(participants) < self.params.threshold:
            raise ThresholdError(
                f"only {len(participants)} sites completed the key setup; the threshold is {self.params.threshold}"
            )
        self._participants = participants
        return {
            recipient: tuple(by_sender[sender][recipient] for sender in participants if sender != recipient)
            for recipient in participants
        }

    def open_phase(self, phase: int, spec: SumSpec) -> None:
        """Start collecting uploads of ``phase`` for statistics described by ``spec``."""
        _ = self.participants  # raises before the key setup is finished
        if not 0 <= phase < self.params.phases:
            raise ProtocolError(f"phase {phase} is outside this job's phases 0..{self.params.phases - 1}")
        if phase in self._phases or phase in self._done:
            raise ProtocolError(f"phase {phase} was already opened; each phase runs once")
        codec = FixedPointCodec(spec, max_sites=len(self.params.sites))
        self._phases[phase] = _Phase(codec=codec, spec_digest=spec.digest(),
                                     total=np.zeros((codec.limbs, codec.size), dtype=np.uint64))

    def add_upload(self, upload: MaskedUpload) -> None:
        """Add one site's masked vector into the phase's running sum (mod 2^(64 L))."""
        state = self._open(upload.phase)
        if upload.job_id != self.params.job_id:
            raise ProtocolError(f"upload for job {upload.job_id!r}, this is {self.params.job_id!r}")
        if state.closed:
            raise ProtocolError(
                f"phase {upload.phase} no longer takes uploads: the unmask request was sent, so "
                f"{upload.site_id!r} counts as dropped"
            )
        if upload.site_id not in self.participants:
            raise ProtocolError(f"upload from {upload.site_id!r}, which did not complete the key setup")
        if self._fixed is not None and upload.site_id not in self._fixed[0]:
            raise ProtocolError(
                f"upload from {upload.site_id!r}, which was dropped from this job in its first phase; the active set "
                f"is fixed for the job at {list(self._fixed[0])}"
            )
        if upload.site_id in state.uploaded:
            raise ProtocolError(f"a second upload from {upload.site_id!r} in phase {upload.phase}")
        if not hmac.compare_digest(upload.spec_digest, state.spec_digest):
            raise ProtocolError(f"the upload of {upload.site_id!r} was masked for another sum spec")
        if upload.words.shape != state.total.shape:
            raise ProtocolError(
                f"the upload of {upload.site_id!r} has shape {upload.words.shape}, expected {state.total.shape}"
            )
        ring_add(state.total, upload.words)
        state.uploaded.append(upload.site_id)

    def unmask_request(self, phase: int) -> UnmaskRequest | None:
        """Close ``phase`` to uploads and say whose uploads are in the sum; ``None`` if no
        site needs to reveal anything (one-round mode and nobody dropped). The first phase
        closed fixes the active set for the job.

        Raises :class:`ThresholdError` (and abandons the phase, releasing nothing) if fewer
        than ``t`` sites uploaded, and :class:`ActiveSetError` (likewise) if a site of the
        fixed active set did not upload: a job never continues with a smaller active set.
        """
        state = self._open(phase)
        if state.closed:
            return state.request
        active = tuple(site for site in self.participants if site in state.uploaded)
        dropped = tuple(site for site in self.participants if site not in state.uploaded)
        if len(active) < self.params.threshold:
            self._abandon(phase)
            raise ThresholdError(
                f"only {len(active)} of {len(self.participants)} sites uploaded phase {phase}; the threshold is "
                f"{self.params.threshold}: the phase is aborted and nothing is released"
            )
        if self._fixed is not None and (active, dropped) != self._fixed:
            self._abandon(phase)
            missing = [site for site in self._fixed[0] if site not in active]
            raise ActiveSetError(
                f"{missing} did not upload phase {phase}, after the job's active set was fixed at "
                f"{list(self._fixed[0])} by its first phase: the job cannot continue with a smaller active set "
                "(the difference of two sums would be those sites' statistics); nothing of this phase is released"
            )
        self._fixed = (active, dropped)
        state.closed = True
        if self.params.self_masks or dropped:
            state.request = UnmaskRequest(job_id=self.params.job_id, phase=phase, active=active, dropped=dropped)
        return state.request

    def finish(self, phase: int, reveals: Sequence[Reveal] = ()) -> Statistics:
        """Remove the masks with the sites' reveals and decode the sum over the active sites.

        Raises :class:`ThresholdError` with fewer than ``t`` valid replies and
        :class:`VerificationError` when a recovered seed or key does not match what its
        owner advertised; either way the phase is abandoned and nothing is released.
        """
        state = self._open(phase)
        if not state.closed:
            raise ProtocolError(f"call unmask_request({phase}) before finish({phase})")
        try:
            if state.request is not None:
                self._unmask(state, state.request, reveals)
            return state.codec.decode(state.total, summed=len(state.uploaded))
        finally:
            self._abandon(phase)

    def _unmask(self, state: _Phase, request: UnmaskRequest, reveals: Sequence[Reveal]) -> None:
        assert self._advertisements is not None
        params, phase = self.params, request.phase
        active, dropped = request.active, request.dropped
        replies: dict[str, Reveal] = {}
        for reveal in reveals:
            if reveal.job_id != params.job_id or reveal.phase != phase:
                raise ProtocolError(f"reveal of {reveal.site_id!r} is for another job or phase")
            if reveal.site_id not in active or reveal.site_id in replies:
                raise ProtocolError(f"unexpected or repeated reveal from {reveal.site_id!r}")
            expected_seeds = set(active) if params.self_masks else set()
            if set(reveal.seed_shares) != expected_seeds or set(reveal.key_shares) != set(dropped):
                raise ProtocolError(f"the reveal of {reveal.site_id!r} does not answer the unmask request")
            replies[reveal.site_id] = reveal
        if len(replies) < params.threshold:
            raise ThresholdError(
                f"only {len(replies)} sites answered the unmask request of phase {phase}; the threshold is "
                f"{params.threshold}: nothing is released"
            )
        stream = _Keystream(*state.total.shape)
        if params.self_masks:
            for owner in active:
                shares = [shamir.Share.from_bytes(params.coordinate(site), reply.seed_shares[owner])
                          for site, reply in replies.items()]
                seed = shamir.combine(shares, threshold=params.threshold)
                committed = self._advertisements[owner].seed_commitments[phase]
                if not hmac.compare_digest(_seed_commitment(params.job_id, owner, phase, seed), committed):
                    raise VerificationError(
                        f"the self-mask seed recovered for {owner!r} does not match its advertised commitment"
                    )
                prg_key = _self_mask_seed(seed, self._digest, params.job_id, phase, owner, state.spec_digest)
                ring_sub(state.total, stream.fill(prg_key))
        for owner in dropped:
            shares = [shamir.Share.from_bytes(params.coordinate(site), reply.key_shares[owner])
                      for site, reply in replies.items()]
            key = X25519PrivateKey.from_private_bytes(shamir.combine(shares, threshold=params.threshold))
            advertised = self._advertisements[owner].mask_keys[phase]
            if not hmac.compare_digest(key.public_key().public_bytes_raw(), advertised):
                raise VerificationError(
                    f"the mask key recovered for {owner!r} does not match its advertised public key"
                )
            for survivor in active:
                shared = _exchange(key, self._advertisements[survivor].mask_keys[phase], survivor)
                seed = _pair_mask_seed(shared, params, self._digest, phase, owner, survivor, state.spec_digest)
                mask = stream.fill(seed)
                # The survivor added +mask if it precedes the dropped site in the roster, else -mask.
                if params.coordinate(survivor) < params.coordinate(owner):
                    ring_sub(state.total, mask)
                else:
                    ring_add(state.total, mask)

    def _open(self, phase: int) -> _Phase:
        state = self._phases.get(phase)
        if state is None:
            raise ProtocolError(f"phase {phase} is not open (finished, aborted or never opened)")
        return state

    def _abandon(self, phase: int) -> None:
        self._phases.pop(phase, None)
        self._done.add(phase)


# --------------------------------------------------------------------------- primitives

def _seed_commitment(job_id: str, site_id: str, phase: int, seed: bytes) -> bytes:
    return hashlib.sha256(frame(_SEED_COMMITMENT_DOMAIN, job_id, site_id, phase, seed)).digest()


def _exchange(private_key: X25519PrivateKey, public_bytes: bytes, owner: str) -> bytes:
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(public_bytes))
    except ValueError:
        raise VerificationError(f"the X25519 key of {owner!r} is a low-order point; refusing it") from None


def _pair_mask_seed(shared: bytes, params: SecureSumParams, digest: bytes, phase: int, one: str, other: str,
                    spec_digest: bytes) -> bytes:
    """PRG key of the pair's mask in ``phase``; the pair is named in roster order, so both
    sites (and a coordinator that recovered one side's key) derive the same key."""
    first, second = sorted((one, other), key=params.coordinate)
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=digest,
        info=frame(_INFO_PAIR_MASK, params.job_id, phase, first, second, spec_digest),
    ).derive(shared)


def _self_mask_seed(seed: bytes, digest: bytes, job_id: str, phase: int, site_id: str, spec_digest: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=digest,
        info=frame(_INFO_SELF_MASK, job_id, phase, site_id, spec_digest),
    ).derive(seed)


@lru_cache(maxsize=2)
def _zeros(size: int) -> bytes:
    return bytes(size)


class _Keystream:
    """A PRG output buffer of ``(limbs, size)`` uint64 words, refilled for each mask.

    :meth:`fill` writes the AES-256-CTR keystream (zero counter block) of an HKDF-derived
    key into the buffer, read as little-endian words. Each key is used for exactly one
    stream, so the fixed counter is safe; reusing one buffer avoids a fresh allocation per
    mask, which costs more than the AES itself.
    """

    def __init__(self, limbs: int, size: int) -> None:
        self._length = limbs * size * 8
        self._buffer = bytearray(self._length + 16)  # update_into wants len(data) + block - 1
        words = np.frombuffer(self._buffer, dtype="<u8", count=limbs * size).reshape(limbs, size)
        self._words = words if words.dtype == np.uint64 else None
        self._shape = (limbs, size)

    def fill(self, key: bytes) -> np.ndarray:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(_zeros(self._length), self._buffer)
        if self._words is not None:
            return self._words
        return np.frombuffer(self._buffer, dtype="<u8", count=self._length // 8).astype(np.uint64).reshape(self._shape)


def _pack_shares(x: int, seeds: Sequence[bytes], keys: Sequence[bytes]) -> bytes:
    return x.to_bytes(2, "big") + len(seeds).to_bytes(2, "big") + len(keys).to_bytes(2, "big") \
        + b"".join(seeds) + b"".join(keys)


def _unpack_shares(data: bytes) -> tuple[int, tuple[bytes, ...], tuple[bytes, ...]]:
    width = shamir.SHARE_BYTES
    if len(data) < 6:
        raise VerificationError("a share bundle is too short")
    x, seeds, keys = (int.from_bytes(data[i:i + 2], "big") for i in (0, 2, 4))
    if len(data) != 6 + (seeds + keys) * width:
        raise VerificationError("a share bundle has the wrong length for its share counts")
    body = data[6:]
    parts = tuple(body[i * width:(i + 1) * width] for i in range(seeds + keys))
    return x, parts[:seeds], parts[seeds:]
