"""A server that lies: the malicious-server suite of issue #24 (Bonawitz et al., CCS 2017, §4
and Fig. 4; Bell et al., CCS 2020).

Each attack is run twice: against :class:`WeakClient`, a client with the malicious-server
defences switched off (what fedmosaic clients did before: accept any threshold, trust the
relayed keys, answer any survivor set), where it recovers the victim's exact input; and
against the real :class:`SecAggPlusClient`, which refuses or detects it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.secagg import (
    ClientStage,
    ConsistencyRequest,
    KeysBroadcast,
    NeighbourGraph,
    SecAggBounds,
    SecAggPlusClient,
    SecAggPlusServer,
    SecAggProtocolError,
    SetupMessage,
    SharesBroadcast,
    SigningIdentity,
    StaticPki,
    UnmaskRequest,
    decode_message,
    minimum_threshold,
    secagg_plus_parameters,
)
from fedmosaic.privacy.secagg.crypto import (
    MaskAccumulator,
    aead_decrypt,
    derive_aead_key,
    derive_mask_seed,
    generate_private_key,
    key_agreement,
    private_key_from_bytes,
    public_key_bytes,
    reconstruct_secret_bytes,
    ring_dtype,
    share_associated_data,
)
from fedmosaic.privacy.secagg.identity import verify_signature
from fedmosaic.privacy.secagg.messages import (
    RosterEntry,
    SecAggConfig,
    advertise_payload,
    consistency_payload,
)
from fedmosaic.privacy.secagg.simulate import make_config


class WeakClient(SecAggPlusClient):
    """The client without its malicious-server checks (test only): any threshold is accepted,
    relayed keys are not verified, and the survivor set of the unmask request is trusted."""

    def check_setup(self, config):
        pass

    def verify_entry(self, config, entry):
        return self.verifier.public_key(entry.identity, entry.credential)

    def unmask_owners(self, message):
        survivors = set(message.survivors)
        return ([v for v in sorted(self._held) if v in survivors],
                [v for v in sorted(self._held) if v not in survivors])

    def handle_consistency(self, message):
        signed = super().handle_consistency(message)
        self._signed_survivors = None  # no memory of what it signed
        return signed

    def handle_unmask(self, message):
        # The old protocol had no consistency round: answer straight after masking.
        if self.stage is ClientStage.AWAITING_CONSISTENCY:
            self.stage = ClientStage.AWAITING_UNMASK
        self._signed_survivors = message.survivors
        return super().handle_unmask(message)


def wire(message):
    return decode_message(message.to_bytes())


def build(n, *, degree, threshold, weak=False, bounds=None, dim=16, seed=0):
    config = make_config(n, dim, degree=degree, threshold=threshold, corrupted_fraction=0.0,
                         round_id=77 + seed)
    signers = [SigningIdentity.generate(f"client/{u}") for u in range(n)]
    pki = StaticPki({s.identity: s.public_key for s in signers})
    kind = WeakClient if weak else SecAggPlusClient
    clients = [kind(u, signer=signers[u], verifier=pki, bounds=bounds) for u in range(n)]
    server = SecAggPlusServer(config, [s.identity for s in signers])
    x = np.random.default_rng(seed).integers(0, 2**32, size=(n, dim), dtype=np.uint64)
    return config, server, clients, x.astype(ring_dtype(32))


def to_masked(server, clients, x):
    """Run the honest protocol up to the masked inputs; returns them."""
    setup = wire(server.setup_message())
    for c in clients:
        server.receive(wire(c.handle_setup(setup)))
    for u, m in server.broadcast_keys().items():
        server.receive(wire(clients[u].handle_keys(wire(m))))
    masked = {}
    for u, m in server.route_shares().items():
        masked[u] = clients[u].handle_shares(wire(m), x[u])
        server.receive(wire(masked[u]))
    return masked


def unmask_victim(server, v, y_v, b_v, s_v_raw, masked_with):
    """What a server holding both secrets of ``v`` computes: ``v``'s exact input."""
    config = server.config
    total = MaskAccumulator(config.dim, config.bits)
    total.add(np.asarray(y_v))
    total.subtract_stream(b_v)
    s_key = private_key_from_bytes(s_v_raw)
    for w in masked_with:
        seed = derive_mask_seed(key_agreement(s_key, server.roster_entry(w).s_public),
                                server.config.session_id, v, w)
        if w > v:
            total.subtract_stream(seed)
        else:
            total.add_stream(seed)
    return total.value()


def views(server, clients, groups, survivors, colluders=()):
    """The lying consistency round: ``groups[i]`` is shown ``survivors[i]``; returns the
    signatures collected per view. ``colluders`` hand their signing keys to the server, which
    signs every view in their name."""
    collected = []
    for group, view in zip(groups, survivors):
        sigs = []
        for w in group:
            signed = clients[w].handle_consistency(
                wire(ConsistencyRequest(server.config.round_id, w, view)))
            sigs.append((w, signed.signature))
        for w in colluders:
            sigs.append((w, clients[w].signer.sign(
                consistency_payload(server._roster, view))))
        collected.append(tuple(sorted(sigs)))
    return collected


# ----------------------------------------------------------------- double unmasking


def double_unmask(weak):
    """Issue #24's attack: k = 4, t = 2; half of the victim's neighbours are told it dropped,
    the other half that it survived, so they hand out shares of s_v and of b_v."""
    n, v = 10, 0
    config, server, clients, x = build(n, degree=4, threshold=2, weak=weak,
                                       bounds=SecAggBounds(corrupted_fraction=0.0))
    masked = to_masked(server, clients, x)
    holders = sorted(server._holders[v])
    everyone = tuple(sorted(masked))
    said_alive, said_dropped = holders[:2], holders[2:]
    others = [u for u in everyone if u not in holders]
    sig_alive, sig_dropped = views(
        server, clients, [said_alive + others, said_dropped],
        [everyone, tuple(u for u in everyone if u != v)])
    b_shares, s_shares = {}, {}
    for w in said_alive:
        r = clients[w].handle_unmask(wire(UnmaskRequest(config.round_id, w, everyone,
                                                        sig_alive)))
        b_shares[w + 1] = dict(r.seed_shares).get(v)
    dropped_view = tuple(u for u in everyone if u != v)
    for w in said_dropped:
        r = clients[w].handle_unmask(wire(UnmaskRequest(config.round_id, w, dropped_view,
                                                        sig_dropped)))
        s_shares[w + 1] = dict(r.key_shares).get(v)
    b_v = reconstruct_secret_bytes(sorted(b_shares), [b_shares[k] for k in sorted(b_shares)])
    s_v = reconstruct_secret_bytes(sorted(s_shares), [s_shares[k] for k in sorted(s_shares)])
    return unmask_victim(server, v, masked[v].values, b_v, s_v, holders), x[v]


def test_double_unmasking_recovers_the_input_from_clients_without_the_defences():
    recovered, truth = double_unmask(weak=True)
    np.testing.assert_array_equal(recovered, truth)


def test_double_unmasking_is_refused_by_the_real_clients_at_setup():
    with pytest.raises(SecAggProtocolError, match="threshold t=2 is below the minimum"):
        double_unmask(weak=False)


def test_consistency_check_stops_a_split_view_at_the_clients_own_threshold():
    """At the threshold the clients accept (gamma = 0.2 on the complete graph of 10: t = 6)
    with the two corrupted neighbours of the victim signing both views and handing out both
    shares, the honest holders told "dropped" refuse: their view has fewer than t signatures."""
    n, v, corrupted = 10, 0, {1, 2}
    bounds = SecAggBounds()
    t = minimum_threshold(n, n - 1, bounds.corrupted_fraction, bounds.dropout_rate)
    assert t == 6
    config, server, clients, x = build(n, degree=n - 1, threshold=t, bounds=bounds)
    masked = to_masked(server, clients, x)
    everyone = tuple(sorted(masked))
    without_v = tuple(u for u in everyone if u != v)
    honest = [u for u in everyone if u not in corrupted and u != v]
    said_alive, said_dropped = [v, *honest[:4]], honest[4:]
    sig_alive, sig_dropped = views(server, clients, [said_alive, said_dropped],
                                   [everyone, without_v], colluders=sorted(corrupted))
    # What the colluders could add is their own shares of both secrets: 2 < t.
    s_shares = {w + 1: clients[w]._held[v][1] for w in corrupted}
    for w in said_dropped:
        with pytest.raises(SecAggProtocolError, match="valid consistency signatures"):
            clients[w].handle_unmask(wire(UnmaskRequest(config.round_id, w, without_v,
                                                        sig_dropped)))
    for w in said_alive[1:]:
        r = clients[w].handle_unmask(wire(UnmaskRequest(config.round_id, w, everyone,
                                                        sig_alive)))
        assert v in dict(r.seed_shares) and not r.key_shares
    assert len(s_shares) < t  # s_v stays out of reach


def test_a_client_never_answers_a_survivor_set_it_did_not_sign():
    n = 8
    config, server, clients, x = build(n, degree=7, threshold=5)
    masked = to_masked(server, clients, x)
    everyone = tuple(sorted(masked))
    (sigs,) = views(server, clients, [list(everyone)], [everyone])
    fewer = everyone[1:]
    with pytest.raises(SecAggProtocolError, match="not the one this client signed"):
        clients[3].handle_unmask(wire(UnmaskRequest(config.round_id, 3, fewer, sigs)))


# ----------------------------------------------------------------- key substitution


def substitute_keys(weak):
    """Issue #24's attack with n = 30, k = 8, t = 5: the server shows the victim its own keys
    for t of the victim's neighbours, decrypts the shares the victim encrypts to them, and
    reconstructs both of its secrets."""
    n, v = 30, 4
    params = secagg_plus_parameters(n, 0.1, 0.0)
    config, server, clients, _ = build(n, degree=params.degree, threshold=params.threshold,
                                       weak=weak, bounds=SecAggBounds(corrupted_fraction=0.0))
    setup = wire(server.setup_message())
    for c in clients:
        server.receive(wire(c.handle_setup(setup)))
    keys = server.broadcast_keys()
    targets = sorted(server.neighbour_sets[v])[: config.threshold]
    fake = {w: (generate_private_key(), generate_private_key()) for w in targets}
    entries = tuple(
        RosterEntry(e.client_id, e.identity, public_key_bytes(fake[e.client_id][0]),
                    public_key_bytes(fake[e.client_id][1]), e.contribution, e.signature)
        if e.client_id in fake else e
        for e in keys[v].entries)
    shares = clients[v].handle_keys(wire(KeysBroadcast(config.round_id, v, entries)))
    v_advert = server.roster_entry(v)
    b_parts, s_parts = {}, {}
    for w, blob in shares.ciphertexts:
        if w in fake:
            key = derive_aead_key(key_agreement(fake[w][0], v_advert.c_public),
                                  config.session_id, v, w)
            plain = aead_decrypt(key, blob, share_associated_data(clients[v]._roster, v, w))
            b_parts[w + 1], s_parts[w + 1] = plain[:66], plain[66:]
    b_v = reconstruct_secret_bytes(sorted(b_parts), [b_parts[k] for k in sorted(b_parts)])
    s_raw = reconstruct_secret_bytes(sorted(s_parts), [s_parts[k] for k in sorted(s_parts)])
    assert public_key_bytes(private_key_from_bytes(s_raw)) == v_advert.s_public
    return b_v, s_raw


def test_key_substitution_yields_both_secrets_from_clients_without_signature_checks():
    b_v, s_raw = substitute_keys(weak=True)
    assert len(b_v) == len(s_raw) == 32


def test_key_substitution_is_detected_by_the_signature_check():
    with pytest.raises(SecAggProtocolError, match=r"valid signature \(key substitution"):
        substitute_keys(weak=False)


def test_a_server_cannot_sign_for_a_member_or_reuse_one_identity():
    config, server, clients, _ = build(6, degree=5, threshold=3,
                                       bounds=SecAggBounds(corrupted_fraction=0.0))
    setup = wire(server.setup_message())
    for c in clients:
        server.receive(wire(c.handle_setup(setup)))
    entries = server.broadcast_keys()[0].entries
    mallory = SigningIdentity.generate("client/3")  # same name, key not in the PKI
    e = entries[3]
    payload = advertise_payload(config.session_id, 3, e.identity, bytes(range(32)),
                                e.s_public, e.contribution)
    forged = RosterEntry(3, e.identity, bytes(range(32)), e.s_public, e.contribution,
                         mallory.sign(payload))
    with pytest.raises(SecAggProtocolError, match="valid signature"):
        clients[0].handle_keys(KeysBroadcast(config.round_id, 0,
                                             (*entries[:3], forged, *entries[4:])))
    sybil = RosterEntry(5, entries[4].identity, *[getattr(entries[5], f) for f in
                                                  ("c_public", "s_public", "contribution",
                                                   "signature")])
    with pytest.raises(SecAggProtocolError, match="Sybil"):
        clients[0].handle_keys(KeysBroadcast(config.round_id, 0, (*entries[:5], sybil)))


# ----------------------------------------------------------------- threshold lowering and downgrade


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(5, 300), gamma=st.sampled_from([0.05, 0.1, 0.2, 1 / 3]))
def test_clients_accept_their_minimum_threshold_and_refuse_one_less(n, gamma):
    bounds = SecAggBounds(corrupted_fraction=gamma, min_clients=2)
    try:
        params = secagg_plus_parameters(n, bounds.dropout_rate, gamma)
    except ValueError:
        return
    signer = SigningIdentity.generate("client/0")
    pki = StaticPki({signer.identity: signer.public_key})
    seed = bytes(32)
    ok = SecAggConfig(1, n, params.threshold, params.degree, 4, 32, seed)
    SecAggPlusClient(0, signer=signer, verifier=pki, bounds=bounds).handle_setup(
        SetupMessage(ok))
    lower = SecAggConfig(1, n, params.threshold - 1, params.degree, 4, 32, seed)
    with pytest.raises(SecAggProtocolError, match="below the minimum"):
        SecAggPlusClient(0, signer=signer, verifier=pki, bounds=bounds).handle_setup(
            SetupMessage(lower))


@pytest.mark.parametrize("n", [10, 20, 100, 1000])
def test_the_old_deployment_parameters_are_refused(n):
    """The deployment used gamma = 0: 2t - k = 2, two colluding neighbours sufficed."""
    old = secagg_plus_parameters(n, 0.1, 0.0)
    assert 2 * old.threshold - old.degree == 2
    signer = SigningIdentity.generate("client/0")
    client = SecAggPlusClient(0, signer=signer,
                              verifier=StaticPki({signer.identity: signer.public_key}))
    config = SecAggConfig(1, n, old.threshold, old.degree, 4, 32, bytes(32))
    with pytest.raises(SecAggProtocolError, match="setup refused"):
        client.handle_setup(SetupMessage(config))


def test_parameter_downgrades_are_refused_with_the_reason():
    signer = SigningIdentity.generate("client/0")
    pki = StaticPki({signer.identity: signer.public_key})

    def setup(n, t, k):
        client = SecAggPlusClient(0, signer=signer, verifier=pki, bounds=SecAggBounds())
        client.handle_setup(SetupMessage(SecAggConfig(1, n, t, k, 4, 32, bytes(32))))

    with pytest.raises(SecAggProtocolError, match="k=2 for n=100 cannot be secure"):
        setup(100, 2, 2)  # a sparse graph too thin for gamma = 0.2 (a cycle)
    with pytest.raises(SecAggProtocolError, match="population"):
        setup(2, 1, 1)  # a "sum" of two reveals the other's input
    with pytest.raises(SecAggProtocolError, match="below the minimum"):
        setup(100, 22, 42)  # the right degree, half the threshold


def test_a_roster_shrunk_below_the_population_bound_is_refused():
    _, server, clients, _ = build(6, degree=5, threshold=3,
                                  bounds=SecAggBounds(min_clients=5, corrupted_fraction=0))
    setup = wire(server.setup_message())
    for c in clients[:4]:
        server.receive(wire(c.handle_setup(setup)))
    for c in clients[4:]:
        c.handle_setup(setup)
    entries = server.broadcast_keys()
    with pytest.raises(SecAggProtocolError, match="minimum population 5"):
        clients[0].handle_keys(wire(entries[0]))


# ----------------------------------------------------------------- isolating a victim


def test_isolation_recovers_the_victims_input_from_clients_without_the_defences():
    """Every other client is told the survivors were only the victim and itself: each hands
    out its share of b_v and of every other client's s key, so the server removes b_v and all
    of the victim's pairwise masks, and leaves everyone else's input out of the "sum"."""
    n, v = 8, 0
    config, server, clients, x = build(n, degree=7, threshold=5, weak=True,
                                       bounds=SecAggBounds(corrupted_fraction=0.0))
    masked = to_masked(server, clients, x)
    b_shares, s_shares = {}, {w: {} for w in range(1, n)}
    for w in range(1, n):
        r = clients[w].handle_unmask(wire(UnmaskRequest(config.round_id, w, (v, w), ())))
        b_shares[w + 1] = dict(r.seed_shares)[v]
        for d, share in r.key_shares:
            s_shares[d][w + 1] = share
    total = MaskAccumulator(config.dim, config.bits)
    total.add(np.asarray(masked[v].values))
    xs = sorted(b_shares)
    total.subtract_stream(reconstruct_secret_bytes(xs, [b_shares[k] for k in xs]))
    for w in range(1, n):
        xs = sorted(s_shares[w])
        s_w = private_key_from_bytes(reconstruct_secret_bytes(xs, [s_shares[w][k] for k in xs]))
        seed = derive_mask_seed(key_agreement(s_w, server.roster_entry(v).s_public),
                                config.session_id, w, v)
        total.subtract_stream(seed)  # v < w: v added PRG(s_vw)
    np.testing.assert_array_equal(total.value(), x[v])


def test_isolation_is_refused_the_real_client_will_not_sign_a_tiny_survivor_set():
    n = 8
    config, server, clients, x = build(n, degree=7, threshold=5,
                                       bounds=SecAggBounds(corrupted_fraction=0.0))
    to_masked(server, clients, x)
    with pytest.raises(SecAggProtocolError, match="fewer than t=5"):
        clients[1].handle_consistency(wire(ConsistencyRequest(config.round_id, 1, (0, 1))))
    # Padding the set with clients that then never sign does not help: t signatures needed.
    padded = (0, 1, 2, 3, 4)
    (sigs,) = views(server, clients, [[0, 1]], [padded])
    with pytest.raises(SecAggProtocolError, match="valid consistency signatures"):
        clients[1].handle_unmask(wire(UnmaskRequest(config.round_id, 1, padded, sigs)))


# ----------------------------------------------------------------- grinding the graph seed


def test_grinding_the_graph_seed_beats_a_probabilistic_bound_and_every_graph_clients_refuse():
    """The graph seed hashes every member's contribution, but a server (with a colluding
    client) can still try many graphs. Where the parameters are secure only with probability
    1 - 2^-sigma over the graph, trying ~2^sigma graphs finds one in which an honest client
    has 2t - k corrupted neighbours; clients with ``every_graph`` refuse such parameters."""
    n, gamma = 200, 0.2
    weak = secagg_plus_parameters(n, 0.1, gamma, security_bits=6)  # 2^-10 per graph
    corrupted = set(range(math.ceil(gamma * n)))
    found = None
    for i in range(4000):
        graph = NeighbourGraph(n, weak.degree, hashlib.sha256(b"grind/%d" % i).digest())
        if any(len(nbrs & corrupted) >= 2 * weak.threshold - weak.degree
               for u, nbrs in enumerate(graph.neighbour_sets()) if u not in corrupted):
            found = i
            break
    assert found is not None
    signer = SigningIdentity.generate("client/0")
    pki = StaticPki({signer.identity: signer.public_key})
    config = SecAggConfig(1, n, weak.threshold, weak.degree, 4, 32, bytes(32))
    strict = SecAggBounds(corrupted_fraction=gamma, security_bits=6, every_graph=True)
    with pytest.raises(SecAggProtocolError, match=r"cannot be secure .* for every graph"):
        SecAggPlusClient(0, signer=signer, verifier=pki, bounds=strict).handle_setup(
            SetupMessage(config))
    # The default parameters up to n = 150 (gamma = 0.2) hold for every graph: accepted.
    for size in (20, 100, 150):
        ok = secagg_plus_parameters(size, 0.1, gamma)
        assert ok.log2_security_failure == -math.inf
        SecAggPlusClient(0, signer=signer, verifier=pki,
                         bounds=SecAggBounds(every_graph=True)).handle_setup(SetupMessage(
                             SecAggConfig(1, size, ok.threshold, ok.degree, 4, 32, bytes(32))))


def test_different_rosters_for_different_members_share_nothing_across_them():
    """A server that shows members different rosters (valid signed adverts, but a different
    subset each: so a different graph seed and neighbour graph) could otherwise collect
    consistency signatures from two disjoint 'neighbourhoods' of a victim. Every share is
    encrypted under the roster its sender saw and every consistency signature covers it, so
    nothing crosses between views: the holder refuses the share, the signature does not
    verify."""
    n = 8
    config, server, clients, x = build(n, degree=n - 1, threshold=5)
    setup = wire(server.setup_message())
    for c in clients:
        server.receive(wire(c.handle_setup(setup)))
    full = next(iter(server.broadcast_keys().values())).entries
    # Member 7's advert is left out of the holder's roster: same members otherwise.
    partial = tuple(e for e in full if e.client_id != 7)
    victim, holder = 0, 1
    shares = clients[victim].handle_keys(wire(KeysBroadcast(config.round_id, victim, full)))
    clients[holder].handle_keys(wire(KeysBroadcast(config.round_id, holder, partial)))
    assert clients[victim]._roster != clients[holder]._roster
    blob = dict(shares.ciphertexts)[holder]
    # The others (who saw the holder's roster) share with it too: only the victim's differs.
    others = [(u, dict(clients[u].handle_keys(wire(KeysBroadcast(config.round_id, u, partial)))
                       .ciphertexts)[holder]) for u in range(2, 7)]
    routed = SharesBroadcast(config.round_id, holder, ((victim, blob), *others))
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        clients[holder].handle_shares(wire(routed), x[holder])
    # A signature made under one roster does not count under another.
    survivors = tuple(range(n))
    payload = consistency_payload(clients[victim]._roster, survivors)
    signature = clients[victim].signer.sign(payload)
    assert verify_signature(clients[victim].signer.public_key, signature, payload)
    assert not verify_signature(clients[victim].signer.public_key, signature,
                                consistency_payload(clients[holder]._roster, survivors))
