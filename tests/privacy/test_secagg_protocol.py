"""SecAgg+ state machines (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): sums and attacks."""

import contextlib
import hashlib
import time

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.secagg import (
    AdvertiseKeys,
    ClientStage,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    RosterEntry,
    SecAggAbortError,
    SecAggBounds,
    SecAggConfig,
    SecAggPlusClient,
    SecAggPlusServer,
    SecAggProtocolError,
    ServerStage,
    SetupMessage,
    ShareKeys,
    SharesBroadcast,
    SigningIdentity,
    StaticPki,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from fedmosaic.privacy.secagg.crypto import DeterministicRandom, ring_dtype
from fedmosaic.privacy.secagg.graph import minimum_threshold, prune_members
from fedmosaic.privacy.secagg.messages import advertise_payload
from fedmosaic.privacy.secagg.simulate import DROPOUT_STAGES, make_config, run_round

#: Bounds of clients that tolerate no corrupted member: they accept any t > k/2, so these
#: tests can pick small thresholds; the refusal of weaker setups is tested on its own.
LENIENT = SecAggBounds(min_clients=2, corrupted_fraction=0.0, dropout_rate=0.0)


def wire(message):
    """What the other side sees: the message after encoding and decoding."""
    return decode_message(message.to_bytes())


def pki_of(n):
    """Fresh signing identities for n clients and the simulated PKI that lists them."""
    signers = [SigningIdentity.generate(f"client/{u}") for u in range(n)]
    return signers, StaticPki({s.identity: s.public_key for s in signers})


def make_round(n, dim, *, degree, threshold=None, bits=32, seed=0, round_id=None,
               bounds=LENIENT):
    config = make_config(
        n,
        dim,
        bits=bits,
        degree=degree,
        threshold=threshold,
        corrupted_fraction=0.0,
        round_id=1000 + seed if round_id is None else round_id,
        random_bytes=DeterministicRandom(seed, b"config"),
    )
    signers, pki = pki_of(n)
    server = SecAggPlusServer(config, [s.identity for s in signers])
    clients = [
        SecAggPlusClient(u, signer=signers[u], verifier=pki, bounds=bounds,
                         random_bytes=DeterministicRandom(seed, b"client/%d" % u))
        for u in range(n)
    ]
    return config, server, clients


def random_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    high = 1 << config.bits
    values = rng.integers(0, high, size=(config.num_clients, config.dim), dtype=np.uint64)
    return values.astype(ring_dtype(config.bits))


def modular_sum(rows, bits):
    return (np.asarray(rows).astype(object).sum(axis=0) % (1 << bits)).tolist()


def run_to_shares(server, clients):
    setup = wire(server.setup_message())
    for client in clients:
        server.receive(wire(client.handle_setup(setup)))
    for u, message in server.broadcast_keys().items():
        server.receive(wire(clients[u].handle_keys(wire(message))))
    return server.route_shares()


def run_to_consistency(server, clients, x, skip_masked=()):
    masked = {}
    for u, message in run_to_shares(server, clients).items():
        if u in skip_masked:
            continue
        masked[u] = clients[u].handle_shares(wire(message), x[u])
        server.receive(wire(masked[u]))
    return masked, server.request_consistency()


def run_to_unmask(server, clients, x, skip_masked=(), skip_signing=()):
    masked, checks = run_to_consistency(server, clients, x, skip_masked)
    for w, message in checks.items():
        if w not in skip_signing:
            server.receive(wire(clients[w].handle_consistency(wire(message))))
    return masked, server.request_unmask()


# ----------------------------------------------------------------------------- exact sums


@pytest.mark.parametrize(
    ("n", "degree", "bits"), [(8, 4, 32), (8, 7, 32), (13, 6, 20), (10, 5, 64), (5, 2, 1)]
)
def test_round_without_dropouts_recovers_the_exact_sum(n, degree, bits):
    config, server, clients = make_round(n, 50, degree=degree, bits=bits)
    x = random_inputs(config)
    _, requests = run_to_unmask(server, clients, x)
    for w, request in requests.items():
        server.receive(wire(clients[w].handle_unmask(wire(request))))
    result = server.finalize()
    assert result.survivors == tuple(range(n))
    assert result.total.tolist() == modular_sum(x, bits)
    assert server.stage is ServerStage.DONE


def test_dropouts_at_every_stage_still_give_the_exact_sum_of_survivors():
    # The complete graph of 16, t = 8: every survivor keeps 10 > t answering neighbours.
    config = make_config(
        16, 50, degree=15, threshold=8, corrupted_fraction=0.0,
        random_bytes=DeterministicRandom(3, b"config")
    )
    x = random_inputs(config, seed=3)
    plan = {"advertise": {0}, "share_keys": {1}, "masked_input": {2}, "consistency": {3},
            "unmask": {4}}
    result, *_ = run_round(config, lambda u: x[u], dropout=plan, bounds=LENIENT)
    expected_survivors = sorted(set(range(16)) - {0, 1, 2})
    assert list(result.survivors) == expected_survivors  # 3 and 4 masked: they are included
    assert result.total.tolist() == modular_sum(x[expected_survivors], 32)


def drive(config, x, plan, bounds=LENIENT):
    """One round with scripted dropouts, like ``run_round``, that also returns the graph (known
    only once every key is in) so a test can state who must survive."""
    signers, pki = pki_of(config.num_clients)
    server = SecAggPlusServer(config, [s.identity for s in signers])
    clients = [SecAggPlusClient(u, signer=signers[u], verifier=pki, bounds=bounds)
               for u in range(config.num_clients)]
    graph = {}

    def exchange(stage, outgoing, answer):
        for u, message in outgoing.items():
            if u not in plan.get(stage, ()):
                server.receive(wire(answer(clients[u], wire(message))))

    try:
        exchange("advertise", dict.fromkeys(range(config.num_clients), server.setup_message()),
                 lambda c, m: c.handle(m))
        keys = server.broadcast_keys()
        graph["neighbours"] = server.neighbour_sets
        exchange("share_keys", keys, lambda c, m: c.handle(m))
        exchange("masked_input", server.route_shares(),
                 lambda c, m: c.handle(m, x[c.client_id]))
        exchange("consistency", server.request_consistency(), lambda c, m: c.handle(m))
        exchange("unmask", server.request_unmask(), lambda c, m: c.handle(m))
        return server.finalize(), graph
    except SecAggAbortError as err:
        if "neighbours" not in graph:
            graph["neighbours"] = server.neighbour_sets
        return err, graph


def expected_survivors(config, neighbours, plan):
    """The specification of who ends up in the sum, or None when the round must abort.

    A client stays in only if t of its neighbours are still in (else its shares would be
    useless); the round succeeds when at least t masked inputs arrived and every needed
    secret -- the self-mask seed of each survivor, the masking key of each dropped client
    some survivor masked with -- has t holders that sign the survivor set and then t that
    answer the unmask request.
    """
    t = config.threshold
    dropped_at = {u: stage for stage, members in plan.items() for u in members}
    everyone = set(range(config.num_clients))
    keyed = prune_members(neighbours, everyone - plan["advertise"], t)
    sharing = prune_members(neighbours, {u for u in keyed if dropped_at.get(u) != "share_keys"},
                            t)
    masked = {u for u in sharing if dropped_at.get(u) != "masked_input"}
    signing = {u for u in masked if dropped_at.get(u) != "consistency"}
    answering = {u for u in signing if dropped_at.get(u) != "unmask"}
    if not keyed or not sharing or len(masked) < t:
        return None
    for alive in (masked, signing, answering):
        for v in masked:
            if len(neighbours[v] & sharing & alive) < t:
                return None
        for d in sharing - masked:
            if neighbours[d] & masked and len(neighbours[d] & sharing & alive) < t:
                return None
    return sorted(masked)


@st.composite
def dropout_rounds(draw):
    n = draw(st.integers(5, 20))
    degree = draw(st.integers(2, n - 1))
    # Clients refuse a threshold below their minimum (tested in test_secagg_malicious.py),
    # which without corrupted members is k//2 + 1 (one more for an odd sparse k).
    least = minimum_threshold(n, degree, 0.0, 0.0)
    assume(least is not None)
    threshold = draw(st.integers(least, degree))
    fates = draw(
        st.lists(
            st.sampled_from([None, None, None, None, *DROPOUT_STAGES]), min_size=n, max_size=n
        )
    )
    plan = {stage: {u for u, f in enumerate(fates) if f == stage} for stage in DROPOUT_STAGES}
    return n, degree, threshold, plan, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dropout_rounds())
def test_random_dropout_patterns_give_the_exact_sum_or_abort(case):
    n, degree, threshold, plan, seed = case
    config = make_config(
        n, 50, degree=degree, threshold=threshold, random_bytes=DeterministicRandom(seed)
    )
    x = random_inputs(config, seed)
    outcome, graph = drive(config, x, plan)
    survivors = expected_survivors(config, graph["neighbours"], plan)
    if survivors is None:
        event("aborted")
        assert isinstance(outcome, SecAggAbortError)
        assert "fewer than t=" in str(outcome)
        return
    event("exact sum")
    assert not isinstance(outcome, Exception), outcome
    assert list(outcome.survivors) == survivors
    assert outcome.total.tolist() == modular_sum(x[survivors], 32)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(5, 20),
    fates=st.lists(st.sampled_from([None, None, *DROPOUT_STAGES]), min_size=20, max_size=20),
    seed=st.integers(0, 2**16),
)
def test_classic_secagg_succeeds_whenever_t_plus_one_clients_answer(n, fates, seed):
    # With the complete graph (classic SecAgg) and this implementation's convention that a
    # client's shares go to its n - 1 neighbours only, every survivor needs t *other* clients
    # to answer, so the round succeeds iff at least t + 1 clients answer (issue #20: one
    # dropout fewer than Bonawitz et al., who count the client's own share).
    config = make_config(n, 30, degree=n - 1, random_bytes=DeterministicRandom(seed))
    plan = {stage: {u for u, f in enumerate(fates[:n]) if f == stage} for stage in DROPOUT_STAGES}
    answering = [u for u in range(n) if fates[u] is None]
    masked = [u for u in range(n) if fates[u] in (None, "consistency", "unmask")]
    x = random_inputs(config, seed)
    if len(answering) >= config.threshold + 1:
        result, *_ = run_round(config, lambda u: x[u], dropout=plan)
        assert list(result.survivors) == masked
        assert result.total.tolist() == modular_sum(x[masked], 32)
    else:
        with pytest.raises(SecAggAbortError):
            run_round(config, lambda u: x[u], dropout=plan)


# ----------------------------------------------------------------------------- aborts


def test_abort_when_fewer_than_t_masked_inputs_arrive_reveals_nothing():
    config, server, clients = make_round(6, 20, degree=5, threshold=4)
    x = random_inputs(config)
    with pytest.raises(SecAggAbortError, match="fewer than t=4 survivors"):
        run_to_unmask(server, clients, x, skip_masked={0, 1, 2})
    assert server.stage is ServerStage.ABORTED
    # No consistency or unmask request was ever produced, so no client revealed any share.
    assert all(c.stage is ClientStage.AWAITING_CONSISTENCY for c in clients[3:])
    with pytest.raises(SecAggProtocolError, match="aborted"):
        server.finalize()


def test_abort_when_too_few_clients_answer_the_unmask_request():
    config, server, clients = make_round(6, 20, degree=5, threshold=4)
    x = random_inputs(config)
    _, requests = run_to_unmask(server, clients, x, skip_masked={0})
    for w in (1, 2, 3):  # only 3 < t answer
        server.receive(wire(clients[w].handle_unmask(wire(requests[w]))))
    with pytest.raises(SecAggAbortError, match="fewer than t=4 survivors answered"):
        server.finalize()


def test_abort_when_too_few_clients_advertise_keys():
    _, server, clients = make_round(10, 20, degree=4, threshold=3)
    setup = wire(server.setup_message())
    for client in clients[:3]:
        server.receive(wire(client.handle_setup(setup)))
    with pytest.raises(SecAggAbortError, match="fewer than t=3 survivors"):
        server.broadcast_keys()


def corrupt(share):
    """Another field element, unrelated to the share (errors that cannot cancel by design)."""
    garbage = int.from_bytes(hashlib.sha512(share).digest(), "big")
    return ((int.from_bytes(share, "big") + garbage) % (2**521 - 1)).to_bytes(66, "big")


def answer_with_corrupt_shares(server, clients, requests, liars):
    for w, request in requests.items():
        response = clients[w].handle_unmask(wire(request))
        if w in liars:
            response = UnmaskResponse(
                response.round_id, w,
                tuple((v, corrupt(share)) for v, share in response.seed_shares),
                tuple((v, corrupt(share)) for v, share in response.key_shares),
            )
        server.receive(wire(response))


def test_a_member_that_sends_corrupt_shares_is_skipped_and_the_round_completes():
    """Issue #24: one corrupt unmask share used to abort the round. With spare shares the
    server finds t that match the commitment to b_v (or the public key s_v), names the
    sender, and ignores its shares from then on."""
    config, server, clients = make_round(8, 20, degree=7, threshold=4)
    x = random_inputs(config)
    _, requests = run_to_unmask(server, clients, x, skip_masked={5})  # s_5 is needed too
    answer_with_corrupt_shares(server, clients, requests, liars={1, 2})
    result = server.finalize()
    survivors = [u for u in range(8) if u != 5]
    assert result.total.tolist() == modular_sum(x[survivors], 32)
    assert result.corrupt_share_senders == (1, 2)


def test_too_many_corrupt_shares_abort_without_a_wrong_sum():
    config, server, clients = make_round(6, 20, degree=5, threshold=3)
    x = random_inputs(config)
    _, requests = run_to_unmask(server, clients, x)
    # Each owner has 5 holders: with 3 liars no 3 of them are consistent.
    answer_with_corrupt_shares(server, clients, requests, liars={0, 1, 2})
    with pytest.raises(SecAggAbortError, match="inconsistent shares"):
        server.finalize()


# ----------------------------------------------------------------------------- privacy


def chi_square_uniform(values, bins=256):
    counts = np.bincount(values, minlength=bins)
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_critical(dof, z=4.753):
    """Upper quantile of chi^2(dof) at z standard deviations (Wilson-Hilferty): p ~ 1e-6."""
    h = 2 / (9 * dof)
    return dof * (1 - h + z * np.sqrt(h)) ** 3


@pytest.mark.parametrize("bits", [32, 20])
def test_a_single_masked_vector_is_indistinguishable_from_uniform(bits):
    dim = 1 << 15
    _, server, clients = make_round(10, dim, degree=4, bits=bits, seed=11)
    x = np.zeros((10, dim), dtype=ring_dtype(bits))
    x[1] = (1 << bits) - 1  # constant inputs carry no randomness of their own
    masked, _ = run_to_unmask(server, clients, x)
    critical = chi_square_critical(255)
    for u in (0, 1):
        y = np.asarray(masked[u].values).astype(np.uint64)
        assert int(y.max()) < (1 << bits)
        assert chi_square_uniform((y >> np.uint64(bits - 8)).astype(np.int64)) < critical
        assert chi_square_uniform((y & np.uint64(0xFF)).astype(np.int64)) < critical
        assert abs(y.astype(np.float64).mean() / (1 << bits) - 0.5) < 5 * 0.2887 / np.sqrt(dim)


# ----------------------------------------------------------------------------- attacks


def test_unmask_requests_must_carry_the_signed_survivor_set_and_t_signatures():
    config, server, clients = make_round(8, 20, degree=6, threshold=4)
    x = random_inputs(config)
    _, requests = run_to_unmask(server, clients, x, skip_masked={7})
    w, honest = next(iter(requests.items()))
    other_view = UnmaskRequest(honest.round_id, w, honest.survivors[1:], honest.signatures)
    with pytest.raises(SecAggProtocolError, match="not the one this client signed"):
        clients[w].handle_unmask(wire(other_view))
    unsigned = UnmaskRequest(honest.round_id, w, honest.survivors, honest.signatures[:2])
    with pytest.raises(SecAggProtocolError, match="valid consistency signatures"):
        clients[w].handle_unmask(wire(unsigned))
    forged = tuple((v, bytes(64)) for v, _ in honest.signatures)
    with pytest.raises(SecAggProtocolError, match="valid consistency signatures"):
        clients[w].handle_unmask(wire(UnmaskRequest(honest.round_id, w, honest.survivors,
                                                    forged)))
    with pytest.raises(SecAggProtocolError, match="more than once"):
        clients[w].handle_unmask(wire(UnmaskRequest(
            honest.round_id, w, honest.survivors, (*honest.signatures, honest.signatures[0]))))
    with pytest.raises(SecAggProtocolError, match="addressed to client"):
        clients[w].handle_unmask(wire(requests[next(u for u in requests if u != w)]))
    assert clients[w].stage is ClientStage.AWAITING_UNMASK
    response = clients[w].handle_unmask(wire(honest))
    seeds, keys = {v for v, _ in response.seed_shares}, {v for v, _ in response.key_shares}
    assert seeds.isdisjoint(keys) and 7 not in seeds
    assert keys <= {7}
    with pytest.raises(SecAggProtocolError, match="one unmask request"):
        clients[w].handle_unmask(wire(honest))


def test_clients_sign_one_sorted_survivor_set_that_includes_them():
    config, server, clients = make_round(8, 20, degree=6, threshold=4)
    x = random_inputs(config)
    _, checks = run_to_consistency(server, clients, x)
    w, honest = next(iter(checks.items()))
    survivors = honest.survivors
    bad = {
        "sorted and include it": ConsistencyRequest(honest.round_id, w, survivors[::-1]),
        "include it": ConsistencyRequest(honest.round_id, w,
                                         tuple(v for v in survivors if v != w)),
        "fewer than t=4": ConsistencyRequest(honest.round_id, w,
                                             tuple(sorted({w, *survivors[:2]}))),
        "did not advertise": ConsistencyRequest(honest.round_id, w, (*survivors, 99)),
    }
    for problem, message in bad.items():
        with pytest.raises(SecAggProtocolError, match=problem):
            clients[w].handle_consistency(wire(message))
    signed = clients[w].handle_consistency(wire(honest))
    assert isinstance(signed, ConsistencySignature) and len(signed.signature) == 64
    with pytest.raises(SecAggProtocolError, match="stage"):
        clients[w].handle_consistency(wire(honest))  # it signs one survivor set only


def shares_for(server, clients):
    setup = wire(server.setup_message())
    for client in clients:
        server.receive(wire(client.handle_setup(setup)))
    for u, message in server.broadcast_keys().items():
        server.receive(wire(clients[u].handle_keys(wire(message))))
    return server.route_shares()


def test_tampered_or_misrouted_share_ciphertexts_are_detected():
    config, server, clients = make_round(8, 20, degree=4, threshold=3)
    x = random_inputs(config)
    shares = shares_for(server, clients)
    v, honest = 0, shares[0]
    (s1, c1), (s2, c2), *rest = honest.ciphertexts
    flipped = bytearray(c1)
    flipped[40] ^= 0x80
    tampered = SharesBroadcast(honest.round_id, v, ((s1, bytes(flipped)), (s2, c2), *rest))
    with pytest.raises(SecAggProtocolError, match=f"from client {s1} failed authentication"):
        clients[v].handle_shares(wire(tampered), x[v])
    swapped = SharesBroadcast(honest.round_id, v, ((s1, c2), (s2, c1), *rest))
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        clients[v].handle_shares(wire(swapped), x[v])
    # Another client's ciphertext addressed to someone else also fails (bound recipient).
    other = next(m for u, m in shares.items() if u != v and s1 in dict(m.ciphertexts))
    foreign = dict(other.ciphertexts)[s1]
    redirected = SharesBroadcast(honest.round_id, v, ((s1, foreign), (s2, c2), *rest))
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        clients[v].handle_shares(wire(redirected), x[v])
    assert clients[v].stage is ClientStage.AWAITING_SHARES
    clients[v].handle_shares(wire(honest), x[v])  # the genuine message still works


def test_ciphertexts_replayed_from_another_round_fail_authentication():
    # Same client randomness and the complete graph, so identical keys and neighbours: only
    # the round id differs, and through the session id it changes every derived key.
    _, server_a, clients_a = make_round(6, 10, degree=5, threshold=3, seed=1)
    _, server_b, clients_b = make_round(6, 10, degree=5, threshold=3, seed=1, round_id=99)
    shares_a = shares_for(server_a, clients_a)
    shares_b = shares_for(server_b, clients_b)
    assert shares_a[0].ciphertexts != shares_b[0].ciphertexts
    replay = SharesBroadcast(shares_b[0].round_id, 0, shares_a[0].ciphertexts)
    with pytest.raises(SecAggProtocolError, match="failed authentication"):
        clients_b[0].handle_shares(wire(replay), np.zeros(10, dtype=np.uint32))
    with pytest.raises(SecAggProtocolError, match="round"):
        clients_b[0].handle_shares(wire(shares_a[0]), np.zeros(10, dtype=np.uint32))
    clients_b[0].handle_shares(wire(shares_b[0]), np.zeros(10, dtype=np.uint32))


def resigned(entry, signer, session_id, **changes):
    """``entry`` with ``changes``, signed again by ``signer`` (a member's own key)."""
    fields = {**entry.__dict__, **changes}
    payload = advertise_payload(session_id, fields["client_id"], fields["identity"],
                                fields["c_public"], fields["s_public"], fields["contribution"])
    return RosterEntry(**{**fields, "signature": signer.sign(payload)})


def test_clients_validate_the_key_broadcast():
    config, server, clients = make_round(10, 10, degree=4, threshold=3)
    setup = wire(server.setup_message())
    for client in clients:
        server.receive(wire(client.handle_setup(setup)))
    keys = server.broadcast_keys()
    client, honest = clients[0], keys[0]
    entries = honest.entries
    round_id = honest.round_id
    first = entries[1]
    near = entries[next(iter(client_neighbours(config, entries, 0)))]

    def replaced(entry):
        return tuple(entry if e.client_id == entry.client_id else e for e in entries)

    bad = {
        "non-members": KeysBroadcast(round_id, 0, (*entries, RosterEntry(
            10, "client/10", b"\x09" * 32, b"\x09" * 32, bytes(32), bytes(64)))),
        "more than once": KeysBroadcast(round_id, 0, (*entries, entries[1])),
        "own keys": KeysBroadcast(round_id, 0, entries[1:]),
        "Sybil": KeysBroadcast(round_id, 0, (entries[0], RosterEntry(
            first.client_id, entries[2].identity, first.c_public, first.s_public,
            first.contribution, first.signature), *entries[2:])),
        # A neighbour's entry is verified at once (its keys are used now).
        "valid signature": KeysBroadcast(round_id, 0, replaced(RosterEntry(
            near.client_id, near.identity, b"\x09" * 32, near.s_public,
            near.contribution, near.signature))),
        "not in the PKI": KeysBroadcast(round_id, 0, replaced(RosterEntry(
            near.client_id, "mallory", near.c_public, near.s_public,
            near.contribution, near.signature))),
        "round": KeysBroadcast(round_id + 1, 0, entries),
        "addressed to client 1": KeysBroadcast(round_id, 1, entries),
    }
    for problem, message in bad.items():
        with pytest.raises(SecAggProtocolError, match=problem):
            client.handle_keys(message)
        assert client.stage is ClientStage.AWAITING_KEYS
    # A non-neighbour's tampered entry is verified only when its consistency signature would
    # count: the keys are accepted, and that member's signatures never count.
    far = next(e for e in entries if e.client_id not in client_neighbours(config, entries, 0)
               and e.client_id != 0)
    fake = RosterEntry(far.client_id, far.identity, b"\x09" * 32, far.s_public,
                       far.contribution, far.signature)
    client.handle_keys(KeysBroadcast(round_id, 0, replaced(fake)))
    assert client._signing_key(far.client_id) is None
    assert client._signing_key(near.client_id) == clients[near.client_id].signer.public_key
    config, server, clients = make_round(10, 10, degree=4, threshold=3)
    setup = wire(server.setup_message())
    for c in clients:
        server.receive(wire(c.handle_setup(setup)))
    honest = server.broadcast_keys()[0]  # a fresh round: the first client has taken its keys
    entries, round_id, client = honest.entries, config.round_id, clients[0]
    # A low-order key, validly signed by its (corrupted) owner, is still refused.
    owner = next(v for v in client_neighbours(config, entries, 0))
    low = resigned(entries[owner], clients[owner].signer, config.session_id, c_public=bytes(32))
    forged = tuple(low if e.client_id == owner else e for e in entries)
    with pytest.raises(SecAggProtocolError, match="invalid X25519"):
        client.handle_keys(KeysBroadcast(round_id, 0, forged))
    client.handle_keys(wire(honest))
    with pytest.raises(SecAggProtocolError, match="stage"):
        client.handle_keys(wire(honest))  # a replayed message is out of order


def client_neighbours(config, entries, u):
    from fedmosaic.privacy.secagg.messages import roster_graph_seed

    seed = roster_graph_seed(config, {e.client_id: e.contribution for e in entries})
    return sorted(config.graph(seed).neighbours(u))


def test_clients_validate_setup_and_inputs():
    _, server, clients = make_round(5, 10, degree=2, threshold=2)
    signer, pki = clients[0].signer, clients[0].verifier
    bad_config = SecAggConfig(1, 5, 3, 2, 10, 32, bytes(32))
    with pytest.raises(SecAggProtocolError, match="threshold 3 is not in"):
        SecAggPlusClient(0, signer=signer, verifier=pki).handle_setup(SetupMessage(bad_config))
    with pytest.raises(SecAggProtocolError, match="outside the round"):
        SecAggPlusClient(5, signer=signer, verifier=pki, bounds=LENIENT).handle_setup(
            server.setup_message())
    shares = shares_for(server, clients)
    with pytest.raises(ValueError, match="shape"):
        clients[0].handle_shares(shares[0], np.zeros(9, dtype=np.uint32))
    with pytest.raises(ValueError, match="quantize floats"):
        clients[0].handle_shares(shares[0], np.zeros(10))
    with pytest.raises(ValueError, match="must lie in"):
        clients[0].handle_shares(shares[0], np.full(10, -1, dtype=np.int64))


def test_server_rejects_invalid_client_messages_without_changing_state():
    config, server, clients = make_round(6, 10, degree=4, threshold=3)
    setup = wire(server.setup_message())
    adverts = [c.handle_setup(setup) for c in clients]
    server.receive(wire(adverts[0]))
    with pytest.raises(SecAggProtocolError, match="twice"):
        server.receive(wire(adverts[0]))
    with pytest.raises(SecAggProtocolError, match="not a client"):
        server.receive(AdvertiseKeys(config.round_id, 6, b"\x01" * 32, b"\x02" * 32))
    with pytest.raises(SecAggProtocolError, match="round"):
        server.receive(AdvertiseKeys(config.round_id + 1, 1, b"\x01" * 32, b"\x02" * 32))
    with pytest.raises(SecAggProtocolError, match="contribution"):
        server.receive(AdvertiseKeys(config.round_id, 1, b"\x01" * 32, b"\x02" * 32, b"\x03"))
    for advert in adverts[1:]:
        server.receive(wire(advert))
    keys = server.broadcast_keys()
    with pytest.raises(SecAggProtocolError, match="stage"):
        server.receive(wire(adverts[1]))  # late: the key stage is closed
    share_msgs = {u: clients[u].handle_keys(wire(m)) for u, m in keys.items()}
    partial = ShareKeys(config.round_id, 0, share_msgs[0].ciphertexts[1:])
    with pytest.raises(SecAggProtocolError, match="exactly"):
        server.receive(partial)
    for message in share_msgs.values():
        server.receive(wire(message))
    shares = server.route_shares()
    x = random_inputs(config)
    masked = {u: clients[u].handle_shares(wire(m), x[u]) for u, m in shares.items()}
    with pytest.raises(SecAggProtocolError, match="must be 10 values"):
        server.receive(MaskedInput(config.round_id, 0, np.zeros(9, dtype=np.uint32)))
    for message in masked.values():
        server.receive(wire(message))
    checks = server.request_consistency()
    signatures = {u: clients[u].handle_consistency(wire(m)) for u, m in checks.items()}
    with pytest.raises(SecAggProtocolError, match="not asked to sign"):
        server.receive(ConsistencySignature(config.round_id, 7, bytes(64)))
    for message in signatures.values():
        server.receive(wire(message))
    with pytest.raises(SecAggProtocolError, match="twice"):
        server.receive(wire(signatures[0]))
    requests = server.request_unmask()
    response = clients[0].handle_unmask(wire(requests[0]))
    unrequested = UnmaskResponse(
        config.round_id, 0, response.seed_shares, ((response.seed_shares[0][0], b"\x00" * 66),)
    )
    with pytest.raises(SecAggProtocolError, match="not requested"):
        server.receive(unrequested)
    server.receive(wire(response))
    for w in range(1, 6):
        server.receive(wire(clients[w].handle_unmask(wire(requests[w]))))
    assert server.finalize().total.tolist() == modular_sum(x, 32)


# ----------------------------------------------------------------------------- wire format


def test_every_message_survives_the_byte_encoding():
    config = SecAggConfig(2**63 + 5, 1000, 20, 36, 7, 32, bytes(range(32)))
    keys = (
        RosterEntry(4, "client_04", b"\x01" * 32, b"\x02" * 32, b"\x0a" * 32, b"\x0b" * 64,
                    b"certificate"),
        RosterEntry(9, "h\u00f4pital-9", b"\x03" * 32, b"\x04" * 32, b"\x0c" * 32, b"", b""),
    )
    blobs = ((4, b"\x05" * 160), (9, b"\x06" * 160))
    shares = ((4, b"\x07" * 66),)
    messages = [
        SetupMessage(config),
        AdvertiseKeys(3, 17, b"\x01" * 32, b"\x02" * 32, b"\x0a" * 32, b"\x0b" * 64, b"cert"),
        KeysBroadcast(3, 17, keys),
        KeysBroadcast(3, 17, ()),
        ShareKeys(3, 17, blobs, b"\x0d" * 32),
        SharesBroadcast(3, 17, blobs),
        ConsistencyRequest(3, 17, (1, 2, 3)),
        ConsistencySignature(3, 17, b"\x0e" * 64),
        UnmaskRequest(3, 17, (1, 2, 3), ((1, b"\x0f" * 64), (3, b"\x10" * 71))),
        UnmaskResponse(3, 17, shares, ((9, b"\x08" * 66),)),
    ]
    for message in messages:
        assert decode_message(message.to_bytes()) == message
    for dtype in ("<u4", "<u8"):
        masked = MaskedInput(3, 17, np.arange(7, dtype=dtype) * 12345)
        decoded = decode_message(masked.to_bytes())
        assert decoded.sender == 17 and decoded.values.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(decoded.values, masked.values)


def test_malformed_bytes_raise_protocol_errors():
    good = UnmaskRequest(3, 17, (1, 2, 3), ((1, b"\x0f" * 64),)).to_bytes()
    cases = {
        "shorter than its header": good[:5],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "bad magic": b"XX" + good[2:],
        "version": good[:2] + b"\x09" + good[3:],
        "unknown SecAgg\\+ message type": good[:3] + b"\x63" + good[4:],
    }
    for problem, data in cases.items():
        with pytest.raises(SecAggProtocolError, match=problem):
            decode_message(data)
    with pytest.raises(SecAggProtocolError, match="160 bytes"):
        ShareKeys(1, 1, ((2, b"short"),)).to_bytes()
    with pytest.raises(SecAggProtocolError, match="exceeds its limit"):
        ConsistencySignature(1, 1, bytes(2000)).to_bytes()
    huge = ConsistencySignature(1, 1, bytes(64)).to_bytes()
    with pytest.raises(SecAggProtocolError, match="exceeds its limit"):
        decode_message(huge[:16] + (5000).to_bytes(4, "little") + huge[20:])


def test_session_id_binds_every_parameter():
    base = SecAggConfig(1, 10, 3, 4, 100, 32, bytes(32))
    variants = [
        SecAggConfig(2, 10, 3, 4, 100, 32, bytes(32)),
        SecAggConfig(1, 11, 3, 4, 100, 32, bytes(32)),
        SecAggConfig(1, 10, 2, 4, 100, 32, bytes(32)),
        SecAggConfig(1, 10, 3, 6, 100, 32, bytes(32)),
        SecAggConfig(1, 10, 3, 4, 101, 32, bytes(32)),
        SecAggConfig(1, 10, 3, 4, 100, 31, bytes(32)),
        SecAggConfig(1, 10, 3, 4, 100, 32, b"\x01" * 32),
    ]
    assert len({base.session_id, *(v.session_id for v in variants)}) == 8


# ----------------------------------------------------------------------------- scale


def test_one_hundred_clients_with_a_thousand_parameters_take_seconds():
    config = make_config(100, 1000, random_bytes=DeterministicRandom(5, b"config"))
    x = random_inputs(config, seed=5)
    plan = {"share_keys": {1, 2}, "masked_input": {3, 4, 5}, "consistency": {7}, "unmask": {6}}
    start = time.perf_counter()
    result, up, down, *_ = run_round(config, lambda u: x[u], dropout=plan)
    elapsed = time.perf_counter() - start
    survivors = [u for u in range(100) if u not in {1, 2, 3, 4, 5}]
    assert list(result.survivors) == survivors
    assert result.total.tolist() == modular_sum(x[survivors], 32)
    assert elapsed < 20.0
    # Upload is O(k + dim) per client; the download is O(n + k): the roster of every
    # member's signed keys (the graph seed hashes them all) and the survivor signatures.
    assert up.max() < 4 * 1000 + 250 * config.degree + 1000
    assert down.max() < 300 * config.degree + 200 * 100 + 1000


# ----------------------------------------------------------------------------- robustness


def client_zero_inbox(stage):
    """Client 0 of a fresh round, about to handle the server message of `stage` (as bytes)."""
    config, server, clients = make_round(6, 8, degree=4, threshold=3, seed=21)
    x = random_inputs(config, 21)
    setup = server.setup_message()
    if stage == 0:
        return clients[0], setup.to_bytes(), x[0]
    for client in clients:
        server.receive(wire(client.handle_setup(wire(setup))))
    keys = server.broadcast_keys()
    if stage == 1:
        return clients[0], keys[0].to_bytes(), x[0]
    for u, message in keys.items():
        server.receive(wire(clients[u].handle_keys(wire(message))))
    shares = server.route_shares()
    if stage == 2:
        return clients[0], shares[0].to_bytes(), x[0]
    for u, message in shares.items():
        server.receive(wire(clients[u].handle_shares(wire(message), x[u])))
    checks = server.request_consistency()
    if stage == 3:
        return clients[0], checks[0].to_bytes(), x[0]
    for u, message in checks.items():
        server.receive(wire(clients[u].handle_consistency(wire(message))))
    return clients[0], server.request_unmask()[0].to_bytes(), x[0]


def server_inbox(stage):
    """A server that got every client message of `stage` except client 0's (as bytes)."""
    config, server, clients = make_round(6, 8, degree=4, threshold=3, seed=22)
    x = random_inputs(config, 22)
    setup = wire(server.setup_message())
    replies = [clients[u].handle_setup(setup) for u in range(6)]
    if stage > 0:
        for reply in replies:
            server.receive(wire(reply))
        keys = server.broadcast_keys()
        replies = [clients[u].handle_keys(wire(keys[u])) for u in range(6)]
    if stage > 1:
        for reply in replies:
            server.receive(wire(reply))
        shares = server.route_shares()
        replies = [clients[u].handle_shares(wire(shares[u]), x[u]) for u in range(6)]
    if stage > 2:
        for reply in replies:
            server.receive(wire(reply))
        checks = server.request_consistency()
        replies = [clients[u].handle_consistency(wire(checks[u])) for u in range(6)]
    if stage > 3:
        for reply in replies:
            server.receive(wire(reply))
        requests = server.request_unmask()
        replies = [clients[u].handle_unmask(wire(requests[u])) for u in range(6)]
    for reply in replies[1:]:
        server.receive(wire(reply))
    return server, replies[0].to_bytes()


@st.composite
def mutations(draw, raw):
    data = bytearray(raw)
    kind = draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(stage=st.integers(0, 4), data=st.data())
def test_corrupted_server_messages_only_ever_raise_protocol_errors(stage, data):
    client, raw, vector = client_zero_inbox(stage)
    corrupted = data.draw(mutations(raw))
    # Rejected cleanly or accepted; anything else (KeyError, struct.error, ...) fails the test.
    with contextlib.suppress(SecAggProtocolError):
        client.handle(decode_message(corrupted), vector)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(stage=st.integers(0, 4), data=st.data())
def test_corrupted_client_messages_only_ever_raise_protocol_errors(stage, data):
    server, raw = server_inbox(stage)
    corrupted = data.draw(mutations(raw))
    with contextlib.suppress(SecAggProtocolError):
        server.receive(decode_message(corrupted))


def test_clients_refuse_rounds_outside_their_population_bounds():
    signers, pki = pki_of(1)
    bounds = SecAggBounds(min_clients=5, max_clients=1000)
    for n in (2**31, 4):
        config = SecAggConfig(1, n, 3, 3, 10, 32, bytes(32))
        client = SecAggPlusClient(0, signer=signers[0], verifier=pki, bounds=bounds)
        with pytest.raises(SecAggProtocolError, match=r"outside this client's accepted "
                                                      r"population \[5, 1000\]"):
            client.handle_setup(SetupMessage(config))
