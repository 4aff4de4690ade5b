"""The in-process SecAgg+ driver (Bell et al., CCS 2020; Bonawitz et al., CCS 2017)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.privacy.secagg import (
    SecAggAbortError,
    SecAggBounds,
    SecAggPlusClient,
    SecAggPlusServer,
    SecAggProtocolError,
    SigningIdentity,
    StaticPki,
    secagg_plus_parameters,
    secure_sum,
    secure_sum_int,
)
from fedmosaic.privacy.secagg.crypto import (
    DeterministicRandom,
    private_key_from_bytes,
    public_key_bytes,
    reconstruct_secret_bytes,
)
from fedmosaic.privacy.secagg.messages import self_mask_commitment
from fedmosaic.privacy.secagg.quantize import Quantizer
from fedmosaic.privacy.secagg.simulate import make_config

HEADER = 12  # "SA" | version | type | round id


def test_secure_sum_of_floats_matches_the_clipped_sum_of_survivors():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, size=(20, 300))
    plan = {"advertise": {0}, "share_keys": {7}, "masked_input": {3}, "unmask": {12}}
    # t = 6 of k = 10 is the minimum only for clients that tolerate no corrupted member.
    result = secure_sum(x, clip=1.0, dropout=plan, seed=4, degree=10, threshold=6,
                        corrupted_fraction=0.0)
    assert result.survivors == [u for u in range(20) if u not in {0, 7, 3}]
    exact = np.clip(x[result.survivors], -1.0, 1.0).sum(axis=0)
    bound = Quantizer(clip=1.0, bits=32, num_clients=20).error_bound(len(result.survivors))
    assert np.abs(result.sum - exact).max() < bound
    assert result.sum.dtype == np.float64


def test_message_sizes_are_counted_exactly():
    n, dim = 12, 100
    result = secure_sum_int(np.ones((n, dim), dtype=np.uint32), degree=6, threshold=4, seed=1,
                            corrupted_fraction=0.0)
    assert result.sum.tolist() == [n] * dim
    k, sig = 6, 4 + 64  # a P-256 signature: length prefix and r || s
    up = (
        (HEADER + 4 + 64 + 32 + sig + 4)  # two keys, contribution, signature, no certificate
        + (HEADER + 8 + k * (4 + 160) + 32)  # encrypted shares per neighbour, commitment
        + (HEADER + 9 + 4 * dim)  # the masked vector, 4 bytes per coordinate
        + (HEADER + 4 + sig)  # the signature on the survivor set
        + (HEADER + 12 + k * (4 + 66))  # one share per neighbour
    )
    identities = sum(len(f"client/{u}") for u in range(n))
    down = (
        (HEADER + 17 + 32)  # parameters and the server's graph-seed nonce
        + (HEADER + 8 + n * (4 + 4 + 96 + sig + 4) + identities)  # every member's signed keys
        + (HEADER + 8 + k * (4 + 160))  # shares addressed to this client
        + (HEADER + 8 + 4 * n)  # the survivor set to sign
        + (HEADER + 12 + 4 * n + n * (4 + sig))  # the survivor set and every signature
    )
    assert result.bytes_up_per_client.tolist() == [up] * n
    assert result.bytes_down_per_client.tolist() == [down] * n
    assert np.all(result.client_seconds > 0) and result.server_seconds > 0


def test_costs_of_clients_that_drop_stop_at_the_stage_they_drop():
    x = np.zeros((10, 50), dtype=np.uint32)
    plan = {"advertise": {0}, "unmask": {1}}
    result = secure_sum_int(x, degree=6, threshold=4, dropout=plan, seed=2,
                            corrupted_fraction=0.0)
    assert result.bytes_up_per_client[0] == 0
    assert result.bytes_down_per_client[0] == HEADER + 17 + 32  # it saw the setup only
    assert result.client_seconds[0] == 0
    # Client 1 uploaded its masked input but never answered the unmask request.
    assert result.bytes_up_per_client[1] < result.bytes_up_per_client[2]
    assert 1 in result.survivors


def test_a_seed_makes_the_simulation_reproducible():
    x = np.random.default_rng(3).normal(size=(8, 40))
    a = secure_sum(x, seed=9, degree=4)
    b = secure_sum(x, seed=9, degree=4)
    np.testing.assert_array_equal(a.sum, b.sum)
    np.testing.assert_array_equal(a.bytes_up_per_client, b.bytes_up_per_client)


def test_default_parameters_follow_the_parameter_rule():
    n = 60
    x = np.zeros((n, 10), dtype=np.uint32)
    plan = {"masked_input": set(range(12))}  # 20% scripted, above the 10% default design rate
    result = secure_sum_int(x, dropout=plan, seed=5)
    expected = secagg_plus_parameters(n, 0.2, 0.2)  # gamma = 0.2 by default, never 0
    assert (result.degree, result.threshold) == (expected.degree, expected.threshold)
    assert result.survivors == list(range(12, n))


def test_aborted_rounds_and_bad_arguments_raise():
    x = np.zeros((6, 10), dtype=np.uint32)
    with pytest.raises(SecAggAbortError, match="fewer than t"):
        secure_sum_int(x, degree=5, threshold=4, dropout={"masked_input": {0, 1, 2}}, seed=1,
                       corrupted_fraction=0.0)
    with pytest.raises(ValueError, match="unknown dropout stage"):
        secure_sum_int(x, degree=5, dropout={"later": {1}})
    with pytest.raises(ValueError, match="outside"):
        secure_sum_int(x, degree=5, dropout={"unmask": {6}})
    with pytest.raises(ValueError, match="shape"):
        secure_sum(np.zeros(10))


# Issue #20: the threshold named honestly. A client's shares go to its k neighbours only (not
# to itself, unlike Bonawitz et al., who count the client's own share among n), so on the
# complete graph a round survives n - 1 - t dropouts -- one fewer than the paper's n - t for
# the same t -- and a client's input stays hidden from the server plus t - 1 colluders.


@settings(max_examples=15, deadline=None, derandomize=True)
@given(n=st.integers(5, 20), data=st.data())
def test_complete_graph_tolerates_exactly_n_minus_1_minus_t_dropouts(n, data):
    t = data.draw(st.integers(n // 2 + 1, n - 2))
    stage = data.draw(st.sampled_from(["masked_input", "consistency", "unmask"]))
    x = np.arange(n * 4, dtype=np.uint32).reshape(n, 4)
    edge = set(range(n - 1 - t))
    result = secure_sum_int(x, degree=n - 1, threshold=t, dropout={stage: edge}, seed=n,
                            corrupted_fraction=0.0, dropout_rate=0.0)
    assert len(result.survivors) == n - (len(edge) if stage == "masked_input" else 0)
    with pytest.raises(SecAggAbortError, match="fewer than t="):
        secure_sum_int(x, degree=n - 1, threshold=t, dropout={stage: edge | {n - 1}}, seed=n,
                       corrupted_fraction=0.0, dropout_rate=0.0)


def test_twenty_clients_with_t_14_abort_at_six_dropouts_not_seven():
    x = np.ones((20, 3), dtype=np.uint32)
    ok = secure_sum_int(x, degree=19, threshold=14, dropout={"masked_input": set(range(5))},
                        seed=1, corrupted_fraction=0.0)
    assert ok.sum.tolist() == [15] * 3
    with pytest.raises(SecAggAbortError):
        secure_sum_int(x, degree=19, threshold=14, dropout={"masked_input": set(range(6))},
                       seed=1, corrupted_fraction=0.0)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(n=st.integers(4, 12), data=st.data())
def test_t_minus_1_colluding_neighbours_learn_nothing_t_reconstruct_both_secrets(n, data):
    """Honest-but-curious collusion bound: the shares of t - 1 of a client's neighbours
    interpolate to unrelated values; those of t neighbours give its self-mask seed and key."""
    t = data.draw(st.integers(n // 2 + 1, n - 1))
    config = make_config(n, 4, degree=n - 1, threshold=t, corrupted_fraction=0.0,
                         random_bytes=DeterministicRandom(n))
    signers = [SigningIdentity.generate(f"client/{u}") for u in range(n)]
    pki = StaticPki({s.identity: s.public_key for s in signers})
    bounds = SecAggBounds(min_clients=2, corrupted_fraction=0.0, dropout_rate=0.0)
    clients = [SecAggPlusClient(u, signer=signers[u], verifier=pki, bounds=bounds)
               for u in range(n)]
    server = SecAggPlusServer(config, [s.identity for s in signers])
    for c in clients:
        server.receive(c.handle_setup(server.setup_message()))
    share_msgs = {u: clients[u].handle_keys(m) for u, m in server.broadcast_keys().items()}
    for m in share_msgs.values():
        server.receive(m)
    for u, m in server.route_shares().items():
        server.receive(clients[u].handle_shares(m, np.zeros(4, dtype=np.uint32)))
    victim = 0
    s_public = server.roster_entry(victim).s_public
    commitment = share_msgs[victim].seed_commitment
    colluders = list(range(1, n))
    for size, learns in ((t - 1, False), (t, True)):
        xs = [w + 1 for w in colluders[:size]]
        seed = [clients[w]._held[victim][0] for w in colluders[:size]]
        key = [clients[w]._held[victim][1] for w in colluders[:size]]
        try:
            b = reconstruct_secret_bytes(xs, seed)
            got_b = self_mask_commitment(config.session_id, victim, b) == commitment
        except SecAggProtocolError:
            got_b = False
        try:
            raw = reconstruct_secret_bytes(xs, key)
            got_s = public_key_bytes(private_key_from_bytes(raw)) == s_public
        except SecAggProtocolError:
            got_s = False
        assert got_b is learns and got_s is learns
